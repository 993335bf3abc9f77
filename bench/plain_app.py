"""The baseline bench/serve.py sets beside `ddpm serve`: the registry's champion behind the plain FastAPI app a user
would write instead of Ray Serve. One uvicorn process, one worker, no Ray, no batching across requests.

    .venv/bin/python bench/plain_app.py --tracking-uri URI [--host 127.0.0.1] [--port 8001]

Everything but the serving stack is the service's: the champion's `model` artifact downloaded and loaded as a
replica loads it (`flows.tracking.version_artifact`, `ddpm.checkpoints.load_model`, the GPU if there is one, else
the CPU's cores), each query checked by `parse_generate`, drawn by `generate` and encoded by `png_grid`, and the
same answers: /generate (PNG or JSON, 400 with one line for a bad query) and /health. The champion is read once
at start (the service follows the alias; a benchmark does not move it).
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import threading
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ddpm.checkpoints import load_model
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from flows.distributed import cpu_share
from flows.model_requests import Limits, RequestError, generate, parse_generate, png_grid
from flows.preflight import masked
from flows.tracking import UNET_MODEL, champion_version, version_artifact


def load_champion(uri: str, device: torch.device):
    """(version, model, cfg, diffusion) of the champion in the registry at `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = champion_version(client)
    if found is None:
        raise UserError(f"no champion registered in {masked(uri)}: run the pipeline (`make run`) or give "
                        "--tracking-uri of a registry that has one")
    with tempfile.TemporaryDirectory(prefix="plain-app-") as tmp:
        model, cfg = load_model(version_artifact(client, str(found.version), "model", Path(tmp)), device)
    return str(found.version), model, cfg, GaussianDiffusion.from_config(cfg.diffusion).to(device)


def make_app(uri: str, limits: Limits) -> FastAPI:
    if torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cpu_share(1))
    version, model, cfg, diffusion = load_champion(uri, device)
    # One sampler call at a time: two at once split the cores (or the GPU) and each takes about twice as long.
    drawing = threading.Lock()
    app = FastAPI(title="mnist-ddpm, plain")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ready", "version": version, "device": str(device)}

    @app.get("/generate")
    def draw(request: Request) -> Response:  # a plain def: FastAPI runs it in its thread pool
        try:
            req = parse_generate(request.query_params.multi_items(), cfg, limits, lambda: secrets.randbelow(2**32))
        except RequestError as exc:
            return PlainTextResponse(f"error: {exc}\n", status_code=400, headers={"X-Model-Version": version})
        with drawing:
            ((images, labels),) = generate(model, diffusion, cfg, [req])
        headers = {"X-Model-Version": version, "X-Seed": str(req.seed)}
        if req.format == "json":
            return JSONResponse({"version": version, "seed": req.seed, "sampler": req.sampler, "steps": req.steps,
                                 "guidance": req.guidance, "digit": req.digit, "labels": labels,
                                 "images": images.tolist()}, headers=headers)
        return Response(png_grid(images), media_type="image/png", headers=headers)

    print(f"serving {UNET_MODEL} v{version} (champion of {masked(uri)}) on {device}", flush=True)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True, help="the registry whose champion to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    try:
        app = make_app(args.tracking_uri, Limits())
    except UserError as exc:
        parser.exit(2, f"error: {exc}\n")
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
