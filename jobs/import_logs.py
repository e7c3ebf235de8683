"""Convert a public dataset layout (KuaiComt, MicroLens-100k, RecBole atomic files) into raw Parquet logs.

    python jobs/import_logs.py --format kuaicomt --src /data/KuaiComt --out runs/kuaicomt/raw
    python jobs/import_logs.py --format recbole --src /data/ml-100k --out runs/ml100k/raw --validate
    python jobs/import_logs.py --format recbole --src /data/ml-100k --out runs/ml100k/raw \
        --title-field movie_title --text-fields release_year,class

Column layouts assumed per format: see ``lsvcr_dist/data/importers.py``. Prints ``import.json`` as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _cli import DEFAULT_ENV  # importing _cli also puts the repository on sys.path when run from a checkout


def main(argv: list[str] | None = None) -> int:
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    from lsvcr_dist.data.importers import FORMATS, import_logs
    from lsvcr_dist.data.raw import RawDataError, validate_raw

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--src", required=True, help="folder holding the dataset's files")
    p.add_argument("--out", required=True, help="raw folder to write (e.g. RUN_DIR/raw)")
    p.add_argument("--shard-rows", type=int, default=1_000_000, help="rows per raw Parquet part file")
    p.add_argument("--validate", action="store_true", help="run raw.validate_raw on the result")
    p.add_argument("--title-field", default="", help="recbole: item field holding the title (default: title, "
                   "movie_title, item_title, item_name or name, the first present)")
    p.add_argument("--text-fields", default="", help="recbole: comma-separated item fields appended to the title")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        info = import_logs(args.format, args.src, args.out, args.shard_rows, title_field=args.title_field,
                           text_fields=tuple(f for f in args.text_fields.split(",") if f.strip()))
        if args.validate:
            info["validated"] = validate_raw(args.out)
    except RawDataError as e:  # bad input: one line naming the file, row and column
        print(f"import_logs: {e}", file=sys.stderr)
        return 1
    info["wall_s"] = round(time.time() - t0, 2)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
