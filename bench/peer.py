"""The peer: one dlt run (rest_api resource, `merge` on the id into duckdb, incremental cursor) as a whole process.

    python bench/peer.py VIEW_URL FOLDER

The pipeline, its state and the duckdb file live in FOLDER: the first run loads the view, a
second run on the same FOLDER is dlt's incremental re-run. The incremental cursor is
`lastModified`, filtered by dlt itself (no request parameter), so dlt fetches every page of the
view as the agent does. Telemetry is off. Prints one JSON line: the rows dlt loaded and the
seconds after imports.

Needs the `bench` extra: pip install -e '.[bench]'.
"""
from __future__ import annotations

import json
import os
import sys
import time

PAGE = 1000


def main(url: str, folder: str) -> None:
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ.setdefault("DLT_DATA_DIR", os.path.join(folder, "dlt-data"))
    import dlt
    from dlt.sources.helpers.rest_client.paginators import PageNumberPaginator
    from dlt.sources.rest_api import rest_api_source

    start = time.perf_counter()
    source = rest_api_source({
        "client": {"base_url": url, "paginator": PageNumberPaginator(base_page=1, page_param="page", total_path=None)},
        "resources": [{
            "name": "leads",
            "primary_key": "lastSubmissionID",
            "write_disposition": "merge",
            "endpoint": {
                "path": "",
                "params": {"pageSize": PAGE},
                "data_selector": "records",
                "incremental": {"cursor_path": "lastModified", "initial_value": "1970-01-01T00:00:00Z"},
            },
        }],
    })
    pipeline = dlt.pipeline(pipeline_name="peer", pipelines_dir=os.path.join(folder, "pipelines"),
                            destination=dlt.destinations.duckdb(os.path.join(folder, "peer.duckdb")), dataset_name="view")
    info = pipeline.run(source)
    rows = pipeline.last_trace.last_normalize_info.row_counts.get("leads", 0) if pipeline.last_trace.last_normalize_info else 0
    info.raise_on_failed_jobs()
    print(json.dumps({"rows": rows, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
