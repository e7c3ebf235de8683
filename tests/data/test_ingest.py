"""Ingest: driver-side shard validation, numpy batches, and a real 2-worker Ray Train ingest (``tiny_prepared``)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _ray_order import preserve_order

from lsvcr_dist.data.ingest import read_instances, to_numpy_batch, validate_shards, with_block_size
from lsvcr_dist.data.manifest import ManifestError, read_manifest
from lsvcr_dist.data.shards import ShardError, flatten_nested
from lsvcr_dist.schema import SchemaError, fixed_list_to_numpy


@pytest.fixture()
def data_copy(tiny_prepared, tmp_path):
    """A private copy of the prepared tiny data dir that a test may damage."""
    run_dir, _, _ = tiny_prepared
    dst = tmp_path / "data"
    shutil.copytree(Path(run_dir) / "data", dst)
    return dst


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_truncated_shard_fails_naming_file(data_copy):
    m = read_manifest(data_copy)
    part = data_copy / m["shards"]["parquet"]["train"][1]
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(ShardError, match=rf"{part}: truncated or corrupt Parquet"):
        read_instances(data_copy, "train")
    tar = data_copy / m["shards"]["webdataset"]["val"][0]
    tar.write_bytes(tar.read_bytes()[: 50_000])
    with pytest.raises(ShardError, match=rf"{tar}: truncated"):
        validate_shards(data_copy, "val", "webdataset")


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_schema_mismatch_and_missing_file_named(data_copy):
    m = read_manifest(data_copy)
    part = data_copy / m["shards"]["parquet"]["test"][0]
    pq.write_table(pq.read_table(part).drop_columns(["target_seen"]), part)
    with pytest.raises(ShardError, match=rf"{part}: schema mismatch: missing column 'target_seen'"):
        read_instances(data_copy, "test")
    gone = data_copy / m["shards"]["webdataset"]["train"][0]
    gone.unlink()
    with pytest.raises(ShardError, match=rf"{gone}: file listed in the manifest does not exist"):
        read_instances(data_copy, "train", fmt="webdataset")
    with pytest.raises(ManifestError, match="no split 'dev'"):
        validate_shards(data_copy, "dev")


def test_to_numpy_batch_shapes_and_errors():
    dims = {"L": 2, "K": 3}
    x = np.arange(4 * 2 * 3).reshape(4, 2, 3)
    from lsvcr_dist.schema import numpy_to_fixed_list

    t = pa.table({"comment_hist_comments": numpy_to_fixed_list(x), "video_hist": numpy_to_fixed_list(x[:, :, 0]),
                  "task": pa.array([0, 1, 1, 0])})
    out = to_numpy_batch(flatten_nested(t).slice(1, 3), dims)  # flattened + sliced, as inside Ray
    assert out["comment_hist_comments"].tolist() == x[1:].tolist()
    assert out["video_hist"].tolist() == x[1:, :, 0].tolist() and out["task"].tolist() == [1, 1, 0]
    with pytest.raises(SchemaError, match=r"column 'video_hist': expected per-row shape \(5,\), got \(2,\)"):
        to_numpy_batch(t.drop_columns(["comment_hist_comments"]), {"L": 5, "K": 3})


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_formats_equal_and_epoch_order_seeded(tiny_prepared):
    """Parquet and WebDataset stream identical rows; the local shuffle is seeded by seed + epoch."""
    import ray

    from lsvcr_dist.data.ingest import epoch_iterator

    run_dir, _, _ = tiny_prepared
    data = Path(run_dir) / "data"
    with preserve_order():
        a = pa.concat_tables(ray.get(read_instances(data, "val").to_arrow_refs()))
        b = pa.concat_tables(ray.get(read_instances(data, "val", fmt="webdataset").to_arrow_refs()))
        assert a.num_rows == sum(read_manifest(data)["splits"]["val"].values()) and a.equals(b)
        c = pa.concat_tables(ray.get(read_instances(data, "val", tasks=["comment"]).to_arrow_refs()))
        assert set(c.column("task").to_pylist()) == {1} and c.num_rows == read_manifest(data)["splits"]["val"]["comment"]
        ds = read_instances(data, "val").materialize()  # read once, iterated four times below

        def order(epoch, seed, rank=0):
            it = ds.iterator()
            return [int(u) * 10**11 + int(t) * 2 + int(k)
                    for bt in epoch_iterator(it, 64, epoch, seed, 256, rank, dims=read_manifest(data)["dims"])
                    for u, t, k in zip(bt["user_id"], bt["timestamp"], bt["task"])]

        e0, e0_again, e1, r1 = order(0, 3), order(0, 3), order(1, 3), order(0, 3, rank=1)
        assert e0 == e0_again and e0 != e1 and e0 != r1 and sorted(e0) == sorted(e1)


def test_block_size_cuts_map_output_into_blocks(ray_local):
    """With ``block_mb=1`` a map's 8 x 300 KiB output leaves in two blocks (a block is cut once it passes 1 MiB:
    4 rows) instead of one; the rows are the same, and the process's default context is untouched."""
    import ray

    def fat_rows(batch: dict) -> dict:  # nested: Ray ships it by value (the test module is not importable there)
        return {"id": batch["id"], "blob": np.repeat(batch["id"][:, None], 300 * 1024 // 8, axis=1)}

    def build():
        return ray.data.range(8, override_num_blocks=1).map_batches(fat_rows, batch_size=1)

    default = ray.data.DataContext.get_current().target_max_block_size
    plain, cut = build().materialize(), with_block_size(build(), 1).materialize()
    assert ray.data.DataContext.get_current().target_max_block_size == default
    assert with_block_size(build(), 0).context.target_max_block_size == default
    assert plain.num_blocks() == 1
    assert cut.num_blocks() == 2
    rows = lambda ds: [(r["id"], int(r["blob"].sum())) for r in ds.take_all()]  # noqa: E731
    assert rows(cut) == rows(plain) == [(i, i * 300 * 1024 // 8) for i in range(8)]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_two_worker_ingest_every_row_once(tiny_prepared, tmp_path):
    """TorchTrainer, 2 workers x 0.5 CPU: per epoch the workers see disjoint rows covering the split exactly once,
    the same number of batches, intact [L, K] comment histories, and a different order in epoch 1, which both
    workers replay from their ``EpochCache`` (the epoch-cache unit tests show a replay equals a fresh stream)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lsvcr_dist.data.ingest import ingest_data_config, probe_loop

    run_dir, _, _ = tiny_prepared
    data = Path(run_dir) / "data"
    m = read_manifest(data)
    t = pa.concat_tables([pq.read_table(data / r) for r in m["shards"]["parquet"]["val"]])
    n = t.num_rows
    assert n % 2 == 0  # equal=True splits would leave one row out of an odd epoch
    bs = max(d for d in range(1, 65) if (n // 2) % d == 0)  # drop_last then drops nothing
    L, K = m["dims"]["L"], m["dims"]["K"]
    sums = fixed_list_to_numpy(t.column("comment_hist_comments"), (L, K)).reshape(n, -1).sum(1)
    expected = Counter(zip(t.column("user_id").to_pylist(), t.column("timestamp").to_pylist(),
                           t.column("task").to_pylist(), sums.tolist()))
    out = tmp_path / "probe"
    trainer = TorchTrainer(
        probe_loop,
        train_loop_config={"out_dir": str(out), "batch_size": bs, "epochs": 2, "seed": 11, "shuffle_window": 128,
                           "dims": m["dims"], "cache_mb": 64},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"train": read_instances(data, "val")}, dataset_config=ingest_data_config(),
        run_config=RunConfig(storage_path=str(tmp_path / "storage"), name="ingest_probe"))
    trainer.fit()
    recs = {(r, e): json.loads((out / f"rank{r}_epoch{e}.json").read_text()) for r in (0, 1) for e in (0, 1)}
    assert [recs[(r, e)]["replayed"] for r in (0, 1) for e in (0, 1)] == [False, True, False, True]
    for e in (0, 1):
        k0, k1 = recs[(0, e)]["keys"], recs[(1, e)]["keys"]
        assert recs[(0, e)]["batches"] == recs[(1, e)]["batches"] == n // 2 // bs
        assert all(k[4] == [L, K] for k in k0 + k1)
        seen = Counter(tuple(k[:4]) for k in k0 + k1)
        assert seen == expected  # every row exactly once, content intact
        assert not (set(map(tuple, (k[:4] for k in k0))) & set(map(tuple, (k[:4] for k in k1))))
    assert [k[:3] for k in recs[(0, 0)]["keys"]] != [k[:3] for k in recs[(0, 1)]["keys"]]


def test_shuffled_batches_deterministic_cover_all():
    import torch

    from lsvcr_dist.data.ingest import shuffled_batches

    windows = [{"x": torch.arange(s, min(s + 10, 37))} for s in range(0, 37, 10)]
    run = lambda seed, drop: [b["x"].tolist() for b in shuffled_batches(  # noqa: E731
        windows, 4, None if seed is None else np.random.default_rng(seed), drop)]
    assert run(None, True) == [list(range(i, i + 4)) for i in range(0, 36, 4)]
    a, a2, b = run(5, True), run(5, True), run(6, True)
    assert a == a2 and a != b and len(a) == 9 and all(len(x) == 4 for x in a)
    flat = [v for x in run(5, False) for v in x]
    assert sorted(flat) == list(range(37)) and len(run(5, False)[-1]) == 1
    # rows move only inside their window of 10 (bounded reordering, like a shuffle buffer)
    assert sorted(flat[:10]) == list(range(10))


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_train_split_mixes_users_in_every_batch(tiny_prepared, tmp_path):
    """The train split is written in its seeded global order: batches of 16 consecutive rows hold about 15 users
    (val, written in (user, time) order, a few), the same rows for the same (seed, epoch) and in another order
    for the next epoch; a train split without that order is refused, naming the manifest."""
    from lsvcr_dist.data.ingest import TRAIN_ORDER, epoch_iterator

    run_dir, _, _ = tiny_prepared
    data = Path(run_dir) / "data"
    m = read_manifest(data)
    assert m["train_order"] == {"kind": TRAIN_ORDER, "seed": m["seed"]}

    def users_per_batch(split, bs=16):
        users = np.concatenate([pq.read_table(data / f, columns=["user_id"]).column(0).to_numpy()
                                for f in m["shards"]["parquet"][split]])
        return np.mean([len(set(users[i:i + bs])) for i in range(0, len(users) - bs + 1, bs)])

    # val holds a few rows per user in (user, time) order: about 4 users per 16 rows on tiny, against ~15 in train
    assert users_per_batch("train") >= 14.0 > 3 * users_per_batch("val")
    with preserve_order():
        ds = read_instances(data, "train", tasks=["video"]).materialize()  # read once, iterated three times

        def stream(epoch):
            # drop_last=False: the dropped partial batch holds other rows in another epoch
            return [(int(u), int(t)) for bt in epoch_iterator(
                ds.iterator(), 16, epoch, 5, 512, dims=m["dims"], drop_last=False)
                    for u, t in zip(bt["user_id"], bt["timestamp"])]

        e0, e0_again, e1 = stream(0), stream(0), stream(1)
    assert e0 == e0_again and e0 != e1 and sorted(e0) == sorted(e1)
    assert np.mean([len({u for u, _ in e0[i:i + 16]}) for i in range(0, len(e0), 16)]) >= 14.0
    old_data = tmp_path / "user_ordered"
    shutil.copytree(data, old_data)
    legacy = {k: v for k, v in m.items() if k != "train_order"}
    (old_data / "manifest.json").write_text(json.dumps(legacy))
    with pytest.raises(ShardError, match=rf"{old_data / 'manifest.json'}: the train split is not in the seeded global"):
        read_instances(old_data, "train")
    read_instances(old_data, "val")  # evaluation splits keep (user, time) order


def test_train_order_key_is_a_seeded_permutation():
    """The key depends on (seed, user, seq) only: the same rows in any order give the same keys; another seed gives
    another order; keys of 10k rows are distinct and spread over the int63 range."""
    from lsvcr_dist.data.ingest import train_order_key

    users, seqs = np.repeat(np.arange(1, 101), 100), np.tile(np.arange(100), 100)
    k = train_order_key(7, users, seqs)
    perm = np.random.default_rng(0).permutation(len(k))
    assert np.array_equal(train_order_key(7, users[perm], seqs[perm]), k[perm])
    assert len(np.unique(k)) == len(k) and k.min() >= 0 and k.max() > 2**61
    assert not np.array_equal(np.argsort(train_order_key(8, users, seqs)), np.argsort(k))
    first = users[np.argsort(k)][:16]  # the first batch of the order already mixes users
    assert len(set(first.tolist())) >= 14
