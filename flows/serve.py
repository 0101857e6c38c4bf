"""Serve the pipeline flow as a deployment: a cron schedule, at most one run at a time.

Run from the repository root against a running Prefect server (``make server``, then ``make serve``):
``PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve [--cron '0 3 * * *']``.
"""

from __future__ import annotations

import argparse

from flows.pipeline import latent_sft_pipeline

DEPLOYMENT_NAME = "latent-sft"
# Nightly, when nobody waits on the machine; every run starts with DVC skipping what is up to date.
DEFAULT_CRON = "0 3 * * *"


def main(argv: list[str] | None = None) -> None:
    """Serve the deployment until interrupted; flow runs execute in this process's environment."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name (default: %(default)s)")
    parser.add_argument("--cron", default=DEFAULT_CRON, help="schedule, cron syntax, UTC (default: %(default)s)")
    args = parser.parse_args(argv)
    # global_limit: the server starts no second run of the deployment while one runs (the runs would share
    # one workspace and one DVC lock)
    latent_sft_pipeline.serve(name=args.name, cron=args.cron, global_limit=1,
                              description="The latent-sft DVC pipeline, one task per stage")


if __name__ == "__main__":
    main()
