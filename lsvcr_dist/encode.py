"""Offline text encoding LLM(t) of every title and comment into an ``EmbeddingStore`` (Ray Data batch inference).

``which=base``: the base LLM's mean-pooled last hidden states (dim H, ``projected=false``): the frozen text table of
``text_source=store`` alignment and of ablations; under ``llm.text_norm=standardize`` the store is written
standardised (``embeddings`` docstring) and its ``center``/``scale`` define LLM(t) for the later stages.
``which=aligned``: base + the aligned LoRA adapter + (the base store's standardisation) + the aligned SR text MLP
(``llm_emb_mlp``), i.e. the public code's ``photo_embs.npy``/``comment_embs.npy`` (dim ``sr.text_dim``,
``projected=true``), read by fine-tuning.

The public code encodes 14.16M comments one text at a time; here ``map_batches`` runs a pool of ``num_actors``
``TextEncoder`` actors (one GPU and bf16 each when the cluster has GPUs, CPU fp32 otherwise) over batches of text
ids, and the driver streams results into the order-free ``EmbeddingWriter``. ``encode_texts_local`` runs the same
encoder in-process (no Ray) for tests and debugging. No ``ray.init`` here: jobs own the cluster.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from lsvcr_dist.embeddings import EmbeddingError, EmbeddingWriter
from lsvcr_dist.progress import Progress, emit

ALIGN_FINAL = Path("align") / "final"
BLOCK_BATCHES = 256
"""Encode batches per Ray Data block at most. A block is what the driver receives and writes at once, so its size
bounds the time between progress lines and the work a killed actor loses (16,384 texts at batch 64)."""


def aligned_paths(run_dir: str | Path, adapter_dir: str = "") -> tuple[Path, Path]:
    """(LoRA adapter folder, SR weights file) of the aligned checkpoint.

    ``adapter_dir`` is the aligned ``final`` folder holding ``adapter/`` and ``sr.safetensors``; empty =
    ``run_dir/align/final``.

    Raises:
        FileNotFoundError: either is missing (names the path and the job that writes it).
    """
    final = Path(adapter_dir) if adapter_dir else Path(run_dir) / ALIGN_FINAL
    adapter, sr = final / "adapter", final / "sr.safetensors"
    for p in (adapter, sr):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: run jobs/align.py first (or set encode.adapter_dir)")
    return adapter, sr


def load_text_mlp(sr_cfg, sr_file: str | Path, text_in_dim: int) -> torch.nn.Module:
    """The aligned SR model's ``text_mlp`` from ``sr.safetensors`` (keys ``[prefix.]text_mlp.*``).

    Raises:
        KeyError: the file holds no ``text_mlp`` weights (names the file and a few of its keys).
    """
    from safetensors.torch import load_file

    from lsvcr_dist.models.builders import build_sr_model_from_config

    state = load_file(str(sr_file))
    sub = {k.split("text_mlp.", 1)[1]: v for k, v in state.items() if "text_mlp." in k}
    if not sub:
        raise KeyError(f"{sr_file}: no 'text_mlp.*' weights (keys: {sorted(state)[:5]} ...)")
    mlp = build_sr_model_from_config(sr_cfg, text_in_dim=text_in_dim).text_mlp
    mlp.load_state_dict(sub, strict=True)
    return mlp.eval()


class TextEncoder:
    """Callable class for ``map_batches``: ``{"id": [N]}`` (0-based row numbers) -> text ids + vectors.

    Args:
        data_dir: prepared data folder (texts).
        llm: ``LLMConfig`` dict.
        sr: ``SRConfig`` dict (``aligned`` only: the text MLP shape).
        which: ``base`` or ``aligned``.
        adapter: LoRA adapter folder (``aligned``).
        sr_file: ``sr.safetensors`` (``aligned``).
        seed: seed of the tiny backbone's random init (must equal the align stage's).
        norm_store: ``aligned`` only: the base store whose ``center``/``scale`` standardise LLM(t) before the MLP
            (empty = raw, ``llm.text_norm=none``).
        ranges: text-id ranges ``[first, end)`` that the row numbers enumerate (a resumed encode); None = all texts.
    """

    def __init__(self, data_dir: str, llm: dict, sr: dict | None = None, which: str = "base", adapter: str = "",
                 sr_file: str = "", seed: int = 0, norm_store: str = "", ranges: list | None = None) -> None:
        from lsvcr_dist.config import LLMConfig, SRConfig
        from lsvcr_dist.data.transforms import TextTokenizer
        from lsvcr_dist.models.llm_builders import build_causal_lm, resolve_dtype
        from lsvcr_dist.models.llm_rec import LLMRecommender

        cfg = LLMConfig(**llm)
        self.ranges = [tuple(r) for r in ranges] if ranges else None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = resolve_dtype(cfg.dtype, cuda=self.device.type == "cuda")
        self.text = TextTokenizer.from_data_dir(data_dir, cfg)
        lm = build_causal_lm(cfg, self.text.tokenizer, dtype, seed=seed)
        self.mlp = None
        if which == "aligned":
            from peft import PeftModel

            lm = PeftModel.from_pretrained(lm, adapter, is_trainable=False)
            sr_cfg = SRConfig(**{k: v for k, v in (sr or {}).items()})
            self.mlp = load_text_mlp(sr_cfg, sr_file, lm.config.hidden_size).to(self.device)
        elif which != "base":
            raise ValueError(f"encode.which must be 'base' or 'aligned', got {which!r}")
        self.model = LLMRecommender(lm, lm.config.hidden_size, 1, pooling=cfg.pooling).to(self.device).eval()
        self.norm = None
        if norm_store:
            from lsvcr_dist.embeddings import load_text_norm

            norm = load_text_norm(norm_store)
            if norm is None:
                raise ValueError(f"{norm_store}: base store is not standardised but llm.text_norm=standardize "
                                 "(re-run jobs/encode_text.py encode.which=base)")
            self.norm = tuple(torch.from_numpy(a).to(self.device) for a in norm)

    @torch.no_grad()
    def encode_ids(self, text_ids: np.ndarray) -> np.ndarray:
        """``[N]`` text ids -> ``[N, dim]`` float32 (H for base, ``text_dim`` for aligned)."""
        ids, mask = self.text.tokenize(text_ids)
        # Right padding: columns past the batch's longest text are padding everywhere, so dropping them is exact
        # and saves most of the compute when max_text_len (paper: 256) is far above typical comment lengths.
        width = max(1, int(mask.sum(1).max()))
        ids, mask = np.ascontiguousarray(ids[:, :width]), np.ascontiguousarray(mask[:, :width])
        vec = self.model.encode_text(torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device))
        if self.norm is not None:
            vec = (vec - self.norm[0]) / self.norm[1]
        if self.mlp is not None:
            vec = self.mlp(vec.to(next(self.mlp.parameters()).dtype)).float()
        return vec.cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{"id": [N]}`` row numbers of ``ray.data.range`` -> ``{"text_id": [N], "vector": [N, dim]}``."""
        pos = np.asarray(batch["id"], dtype=np.int64)
        text_ids = positions_to_text_ids(pos, self.ranges) if self.ranges else pos + 1
        return {"text_id": text_ids, "vector": self.encode_ids(text_ids)}


def _encoder_kwargs(cfg) -> tuple[dict, dict]:
    """(constructor kwargs of ``TextEncoder``, manifest meta) for an ``EncodeConfig``."""
    data_dir = str(Path(cfg.run_dir) / "data")
    kw = dict(data_dir=data_dir, llm=dataclasses.asdict(cfg.llm), sr=dataclasses.asdict(cfg.sr), which=cfg.which,
              seed=cfg.seed)
    adapter, norm_from = None, None
    if cfg.which == "aligned":
        a, s = aligned_paths(cfg.run_dir, cfg.adapter_dir)
        kw.update(adapter=str(a), sr_file=str(s))
        adapter = str(a)
        trained = _aligned_text_norm(a.parent)
        if trained is not None and trained != cfg.llm.text_norm:
            raise ValueError(f"{a.parent / 'config.yaml'}: alignment ran with llm.text_norm={trained}, this encode "
                             f"has llm.text_norm={cfg.llm.text_norm}: the text MLP would see other inputs")
        if cfg.llm.text_norm == "standardize":
            norm_from = str(Path(cfg.run_dir) / "embeddings" / "base")
            kw.update(norm_store=norm_from)
    llm = cfg.llm
    model = {"tiny_glm": f"tiny_glm(h={llm.hidden_size},layers={llm.num_layers},seed={cfg.seed})",
             "hf": llm.path, "gguf": f"{llm.path}/{llm.gguf_file}".lstrip("/")}.get(llm.kind, llm.kind)
    meta = dict(model=model, kind=llm.kind, adapter=adapter, pooling=llm.pooling, which=cfg.which,
                projected=cfg.which == "aligned", max_text_len=llm.max_text_len, text_norm_input=norm_from)
    return kw, meta


def _aligned_config(final: Path) -> dict:
    """The aligned checkpoint's ``config.yaml`` as a dict (empty when absent)."""
    import yaml

    path = final / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _aligned_text_norm(final: Path) -> str | None:
    """``llm.text_norm`` recorded in the aligned checkpoint's ``config.yaml`` (None when absent)."""
    conf = _aligned_config(final)
    return (conf.get("llm") or {}).get("text_norm", "none") if conf else None


def project_base_store(cfg, log=emit) -> dict:
    """The aligned store of a ``text_source=store`` alignment: the aligned text MLP over the base store's rows.

    That alignment never ran the LLM on titles or comments (its SR model read the frozen base store), so the aligned
    vectors are ``text_mlp(base row)`` exactly as during training; applying the LoRA adapter to the texts would feed
    the MLP vectors it never saw. No LLM pass: rows are projected in chunks on this process.
    """
    from lsvcr_dist.embeddings import EmbeddingStore

    _, sr_file = aligned_paths(cfg.run_dir, cfg.adapter_dir)
    base_dir = Path(cfg.run_dir) / "embeddings" / "base"
    base = EmbeddingStore.open(base_dir)
    mlp = load_text_mlp(cfg.sr, sr_file, base.dim)
    meta = dict(model=f"text_mlp({base_dir})", kind=base.manifest.get("kind"), adapter=None,
                pooling=base.manifest.get("pooling"), which="aligned", projected=True,
                max_text_len=base.manifest.get("max_text_len"), text_norm_input=str(base_dir))
    n = base.count

    def batches():
        with torch.no_grad():
            for start in range(1, n + 1, 65_536):
                ids = np.arange(start, min(start + 65_536, n + 1))
                yield {"text_id": ids, "vector": mlp(torch.from_numpy(base.lookup(ids))).numpy()}

    manifest, secs, writer = _write_store(cfg, batches(), base.num_videos, base.num_comments, meta)
    log(f"projected {n} base-store rows with the aligned text MLP in {secs:.1f}s -> {writer.path}")
    _report_stats(manifest, log)
    return {**manifest, "seconds": secs, "texts_per_s": n / max(secs, 1e-9)}


def _store_source(cfg) -> bool:
    """True when ``which=aligned`` follows a ``text_source=store`` alignment (``project_base_store``)."""
    if cfg.which != "aligned":
        return False
    final = Path(cfg.adapter_dir) if cfg.adapter_dir else Path(cfg.run_dir) / ALIGN_FINAL
    return _aligned_config(final).get("text_source") == "store"


def _counts(data_dir: str) -> tuple[int, int]:
    from lsvcr_dist.data.manifest import read_dims

    dims = read_dims(data_dir)
    if dims["num_videos"] + dims["num_comments"] == 0:
        raise ValueError(f"{data_dir}/manifest.json: no videos and no comments to encode")
    return dims["num_videos"], dims["num_comments"]


def store_path(cfg) -> Path:
    """``run_dir/embeddings/<which>``."""
    return Path(cfg.run_dir) / "embeddings" / cfg.which


def _writer(cfg, dim: int, nv: int, nc: int, meta: dict, resume: bool) -> EmbeddingWriter:
    return EmbeddingWriter(store_path(cfg), dim, nv, nc, cfg.shard_rows, meta,
                           standardize=cfg.which == "base" and cfg.llm.text_norm == "standardize", resume=resume)


def resume_writer(cfg, nv: int, nc: int, meta: dict, log=emit) -> EmbeddingWriter | None:
    """The writer continuing an interrupted encode of the same settings (``cfg.resume``), or None for a fresh one.

    Completed shards are kept (``EmbeddingWriter.pending()`` gives what is left); the log names what was kept or why
    nothing could be.
    """
    dim = EmbeddingWriter.interrupted_dim(store_path(cfg)) if cfg.resume else None
    if dim is None:
        return None
    writer = _writer(cfg, dim, nv, nc, meta, resume=True)
    if writer.resumed:
        left = sum(hi - lo for lo, hi in writer.pending())
        log(f"resuming {writer.path}: {len(writer.resumed)}/{len(writer.shards)} shards already complete, "
            f"{left} of {nv + nc} texts left")
    if writer.resume_note:
        log(f"resume: {writer.resume_note}")
    return writer if writer.resumed else None


def pending_ids(writer: EmbeddingWriter | None, nv: int, nc: int) -> list[tuple[int, int]]:
    """Text-id ranges ``[first, end)`` to encode: all texts, or what a resumed writer still lacks."""
    return writer.pending() if writer is not None else [(1, nv + nc + 1)]


def positions_to_text_ids(pos: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Map positions ``0..N-1`` over the concatenated ``ranges`` (``[first, end)`` text ids) to text ids."""
    pos = np.asarray(pos, dtype=np.int64)
    first = np.array([lo for lo, _ in ranges], dtype=np.int64)
    ends = np.cumsum([hi - lo for lo, hi in ranges])
    which = np.searchsorted(ends, pos, side="right")
    if len(pos) and (pos.min() < 0 or which.max() >= len(ranges)):
        raise ValueError(f"position outside the {int(ends[-1]) if len(ends) else 0} pending texts")
    starts = np.concatenate([[0], ends[:-1]])  # position of each range's first text
    return first[which] + pos - starts[which]


def _write_store(cfg, batches, nv: int, nc: int, meta: dict, writer: EmbeddingWriter | None = None, log=emit):
    """Drain ``{"text_id", "vector"}`` batches into the store at ``run_dir/embeddings/<which>``, printing progress.

    A fresh writer is opened on the first batch because the vector width (H or the projected text_dim) is only known
    then; ``writer`` = a resumed one (``resume_writer``). Returns ``(manifest, seconds, writer)``.
    """
    t0 = time.perf_counter()
    todo = sum(hi - lo for lo, hi in pending_ids(writer, nv, nc))
    prog = Progress(f"encode {cfg.which}", every_s=cfg.progress_every_s, log=log, unit="texts", total_samples=todo)
    for batch in batches:
        if writer is None:
            writer = _writer(cfg, batch["vector"].shape[1], nv, nc, meta, resume=False)
        writer.write(batch["text_id"], batch["vector"])
        prog.update(1, len(batch["text_id"]))
    if writer is None:
        raise EmbeddingError(f"{store_path(cfg)}: no texts were encoded")
    secs = time.perf_counter() - t0
    return writer.close(allow_degenerate=cfg.allow_degenerate), secs, writer


def _report_stats(manifest: dict, log) -> None:
    """Log the store's spread (titles, comments) and, loudly, any near-constant warning."""
    for group, st in manifest.get("stats", {}).items():
        if st.get("rows"):
            log(f"{group}: mean pairwise cosine {st['mean_pairwise_cosine']:.4f}, relative spread "
                f"{st['relative_spread']:.3f}, per-dim std median {st['dim_std']['median']:.3g}")
    for w in manifest.get("warnings", []):
        log(f"WARNING: {w}")


def encode_texts_local(cfg, log=emit) -> dict:
    """Encode every text in this process (no Ray) into ``run_dir/embeddings/<which>``; returns the manifest."""
    if _store_source(cfg):
        return project_base_store(cfg, log)
    kw, meta = _encoder_kwargs(cfg)
    nv, nc = _counts(kw["data_dir"])
    writer = resume_writer(cfg, nv, nc, meta, log)
    ranges = pending_ids(writer, nv, nc)
    enc = TextEncoder(**kw)
    batches = ({"text_id": ids, "vector": enc.encode_ids(ids)}
               for lo, hi in ranges for start in range(lo, hi, cfg.batch_size)
               for ids in [np.arange(start, min(start + cfg.batch_size, hi))])
    manifest, secs, _ = _write_store(cfg, batches, nv, nc, meta, writer, log)
    n = sum(hi - lo for lo, hi in ranges)
    log(f"encoded {n} texts in {secs:.1f}s ({n / max(secs, 1e-9):.0f} texts/s), dim {manifest['dim']}")
    _report_stats(manifest, log)
    return {**manifest, "seconds": secs}


def encode_blocks(n: int, batch_size: int, num_actors: int) -> int:
    """Ray Data blocks of an encode of ``n`` texts: at least 4 per actor (all actors busy to the end), at most
    ``BLOCK_BATCHES`` batches each, never more blocks than batches."""
    per_block = BLOCK_BATCHES * batch_size
    return max(1, min(-(-n // batch_size), max(4 * num_actors, -(-n // per_block))))


def encode_texts(cfg, log=emit) -> dict:
    """Encode every title and comment with a Ray Data actor pool (Ray must be initialised by the caller).

    Args:
        cfg: ``EncodeConfig``.
        log: progress printer.

    Returns:
        The store manifest plus ``seconds`` and ``texts_per_s``.

    Raises:
        FileNotFoundError: prepared data or (``aligned``) the aligned checkpoint missing.
    """
    import ray

    if _store_source(cfg):
        return project_base_store(cfg, log)
    kw, meta = _encoder_kwargs(cfg)
    nv, nc = _counts(kw["data_dir"])
    writer = resume_writer(cfg, nv, nc, meta, log)
    ranges = pending_ids(writer, nv, nc)
    n = sum(hi - lo for lo, hi in ranges)
    kw["ranges"] = ranges
    res = ray.cluster_resources()
    use_gpu = res.get("GPU", 0) >= 1
    # CPU actors hold at most (CPUs - 1) together: the range/read tasks feeding them need a CPU too, or the pool
    # deadlocks on a small box (2 actors x 1 CPU on 2 cores never schedule a read task).
    cpus = 1.0 if use_gpu else max(0.1, min(1.0, (res.get("CPU", 1) - 1) / cfg.num_actors))
    n_blocks = encode_blocks(n, cfg.batch_size, cfg.num_actors)
    ds = ray.data.range(n, override_num_blocks=n_blocks).map_batches(
        TextEncoder, fn_constructor_kwargs=kw, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors), num_gpus=1 if use_gpu else 0, num_cpus=cpus,
    )
    manifest, secs, writer = _write_store(cfg, ds.iter_batches(batch_size=None, batch_format="numpy"), nv, nc, meta,
                                          writer, log)
    rate = n / max(secs, 1e-9)
    log(f"encoded {n} texts ({cfg.which}, dim {manifest['dim']}) with {cfg.num_actors} actor(s) "
        f"{'on GPU' if use_gpu else 'on CPU'} in {secs:.1f}s ({rate:.0f} texts/s) -> {writer.path}")
    _report_stats(manifest, log)
    return {**manifest, "seconds": secs, "texts_per_s": rate}
