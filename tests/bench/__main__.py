"""`make bench`: every benchmark, each reporting ratios against a baseline measured in
the same run on the same broker (this machine is shared and noisy: absolute numbers
wander, ratios much less)."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import sys

import tests.bench


def main() -> None:
    names = sys.argv[1:] or [m.name for m in pkgutil.iter_modules(tests.bench.__path__) if m.name.startswith("bench_")]
    for name in names:
        module = importlib.import_module(f"tests.bench.{name}")
        print(f"== {name}")
        asyncio.run(module.run())


if __name__ == "__main__":
    main()
