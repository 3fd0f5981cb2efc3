"""A Prefect API server (the real app, uvicorn) that counts its HTTP requests, for benchmarks/farm.py.

    python benchmarks/_farm_server.py PORT COUNT_FILE

Every second the running total of requests is written to COUNT_FILE (what the farm benchmark turns into
requests per second). The app is prefect.server.api.server.create_app, the same one `prefect server start` serves.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path


def main() -> None:
    import uvicorn
    from prefect.server.api.server import create_app

    port, out = int(sys.argv[1]), Path(sys.argv[2])
    app = create_app(final=True)
    count = [0]

    inner = app.build_middleware_stack  # count every HTTP request reaching the app

    def counting_app():
        stack = inner()

        async def wrapped(scope, receive, send):
            if scope["type"] == "http":
                count[0] += 1
            await stack(scope, receive, send)

        return wrapped

    app.build_middleware_stack = counting_app

    def flush() -> None:
        while True:
            out.write_text(str(count[0]))
            time.sleep(1.0)

    threading.Thread(target=flush, daemon=True).start()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
