"""Serve the `mnist-ddpm` flow's deployments from a long-lived process.

    mnist-ddpm/full      on demand:  prefect deployment run mnist-ddpm/full --param profile=smoke --watch
    mnist-ddpm/retrain   on a cron schedule (weekly by default): continues the champion for a few more epochs
                         (a cold start trains the profile from scratch) and promotes only a better model; one
                         at a time: a retrain started while another runs is cancelled

Needs PREFECT_API_URL (a Prefect server); the flow runs it starts inherit RAY_ADDRESS and MLFLOW_TRACKING_URI.
The schedule lives here, in code: restarting `serve()` replaces schedules added from the CLI.
"""

from __future__ import annotations

import argparse
import os

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType

from flows.pipeline import mnist_ddpm

RETRAIN_CRON = "0 3 * * 1"  # Mondays 03:00
# A second retrain would continue the same champion as the running one and race it to the registry; cancelled
# rather than queued, so that nothing waits unbounded behind a hung run.
ONE_RETRAIN_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def deployments(retrain_cron: str, retrain_profile: str | None, retrain_epochs: int = 2):
    common = dict(entrypoint_type=EntrypointType.MODULE_PATH, tags=["mnist-ddpm"])
    full = mnist_ddpm.to_deployment(
        name="full", description="The whole pipeline on demand; parameters: profile, overrides, run_name.",
        **common,
    )
    retrain = mnist_ddpm.to_deployment(
        name="retrain", cron=retrain_cron, concurrency_limit=ONE_RETRAIN_AT_A_TIME,
        # Retraining the same recipe from scratch would give the same model byte for byte (training is
        # deterministic), so the scheduled run continues the champion instead.
        parameters={"profile": retrain_profile, "promotion": "if_better", "from_champion": True,
                    "more_epochs": retrain_epochs},
        description="Scheduled retraining: continues the champion (its training state from the registry) for "
                    "more_epochs epochs, and moves the champion alias only when the FLD improves under the same "
                    "evaluator. With no champion yet, trains the profile from scratch.",
        **common,
    )
    return full, retrain


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retrain-cron", default=os.environ.get("MNIST_DDPM_RETRAIN_CRON", RETRAIN_CRON),
                        help=f"cron schedule of mnist-ddpm/retrain (default {RETRAIN_CRON!r}, env "
                             "MNIST_DDPM_RETRAIN_CRON)")
    parser.add_argument("--retrain-profile", default=os.environ.get("MNIST_DDPM_RETRAIN_PROFILE"),
                        help="profile of scheduled retraining (default: gpu where CUDA exists, else cpu)")
    parser.add_argument("--retrain-epochs", type=int, default=int(os.environ.get("MNIST_DDPM_RETRAIN_EPOCHS", 2)),
                        help="epochs each scheduled retrain adds to the champion's (default 2, env "
                             "MNIST_DDPM_RETRAIN_EPOCHS)")
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit("PREFECT_API_URL is not set: start a Prefect server (make cluster-up) and export its "
                         "URL, e.g. PREFECT_API_URL=http://127.0.0.1:4200/api")
    serve(*deployments(args.retrain_cron, args.retrain_profile, args.retrain_epochs))


if __name__ == "__main__":
    main()
