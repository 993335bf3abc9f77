"""`ddpm serve`: the registry's champion on Ray Serve, tested for real.

The refusals are derived from the sampler registry, the schema's bounds and the service's caps, and checked
without Ray. Then one `ddpm serve` subprocess (real Ray Serve, a real MLflow registry in a SQLite file) serves
two versions of a tiny U-Net: v1 unconditional, v2 digit-conditional. Served images must equal, to the byte,
what `run_sampler` draws locally for the same seed when drawn alone, and to a rounding level (`near`) when
batched with other clients' requests; a browser drives the
page; 200 requests from 16 clients see the champion move from v1 to v2 and none is dropped or mixed up.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from netcheck import descendants, free_ports, is_loopback, listeners_of
from served import DDPM, Service, get, get_json, register_versions, set_champion

from ddpm.checkpoints import load_model
from ddpm.config import load_config
from ddpm.diffusion import GaussianDiffusion
from ddpm.generate import labels_for, run_sampler
from ddpm.images import grid
from ddpm.noise import image_seeds, make_noise
from ddpm.pixels import model_to_uint8
from ddpm.samplers import SAMPLERS
from ddpm.schema import BOUNDS, SEED
from flows.model_requests import (
    DEFAULT_IMAGES,
    FALLBACK_SAMPLER,
    QUERY_KEYS,
    QUOTE_CHARS,
    GenerateRequest,
    Limits,
    RequestError,
    default_sampler,
    generate,
    generate_each,
    parse_generate,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FEW_STEP = [name for name, s in SAMPLERS.items() if s.takes_steps]
ALL_STEPS = [name for name, s in SAMPLERS.items() if not s.takes_steps]
LIMITS = Limits(max_images=8, max_steps=12)  # smoke: T = 20, so the step cap (12) is the binding one


def smoke(conditional: bool):
    return load_config("smoke", overrides={"unet.num_classes": "10" if conditional else "0"})


def parse(query: str, conditional: bool = False, limits: Limits = LIMITS) -> GenerateRequest:
    pairs = [tuple(item.split("=", 1)) for item in query.split("&")] if query else []
    return parse_generate(pairs, smoke(conditional), limits, lambda: 99)


# -- the requests a service accepts, without Ray ----------------------------------------------------------------

def refusals() -> list[tuple[str, bool, Limits, str]]:
    """(query, conditional model?, caps, what the refusal must say), from the registries and bounds."""
    T = smoke(False).diffusion.timesteps
    top = min(LIMITS.max_steps, T)
    cases = [
        ("sampler=euler", False, LIMITS, ", ".join(SAMPLERS)),
        ("n=0", False, LIMITS, "[1, 8]"),
        (f"n={LIMITS.max_images + 1}", False, LIMITS, "--max-images"),
        ("n=two", False, LIMITS, "not a whole number"),
        ("digit=3", False, LIMITS, "unconditional"),
        ("guidance=2", False, LIMITS, "unconditional"),
        ("digit=10", True, LIMITS, "[0, 9]"),
        ("digit=-1", True, LIMITS, "[0, 9]"),
        (f"guidance={BOUNDS['sample.guidance_scale'].high + 1:g}", True, LIMITS, "must be <="),
        ("guidance=much", True, LIMITS, "not a number"),
        ("seed=1.5", False, LIMITS, "not a whole number"),
        ("seed=-1", False, LIMITS, "must be >= 0"),
        (f"seed={int(SEED.high) + 1}", False, LIMITS, "unsigned 32-bit"),
        ("colour=red", False, LIMITS, ", ".join(QUERY_KEYS)),
        ("n=1&n=2", False, LIMITS, "twice"),
        ("format=gif", False, LIMITS, "png, json"),
    ]
    for name in FEW_STEP:
        cases += [(f"sampler={name}&steps=0", False, LIMITS, f"[1, {top}]"),
                  (f"sampler={name}&steps={top + 1}", False, LIMITS, "--max-steps")]
    for name in ALL_STEPS:
        cases += [(f"sampler={name}&steps=5", False, LIMITS, "drop steps"),
                  (f"sampler={name}", False, Limits(max_steps=T - 1), f"over this service's --max-steps {T - 1}")]
    return cases


@pytest.mark.parametrize("query,conditional,limits,says", refusals(),
                         ids=[f"{q}{'-conditional' if c else ''}-max{lim.max_steps}" for q, c, lim, _ in refusals()])
def test_each_bad_query_is_refused_in_one_line(query, conditional, limits, says):
    with pytest.raises(RequestError) as refused:
        parse(query, conditional, limits)
    message = str(refused.value)
    assert says in message and "\n" not in message, message


NUMBERS = ["9" * 5000, "-" + "9" * 5000, "0" * 5000 + "1", "1_000", "0x10", "1e3", "+1", " ", "", "\uff11",
           "\u0663", "1" * 20]


@pytest.mark.parametrize("key", ["n", "steps", "digit", "seed", "guidance"])
def test_numbers_of_any_length_and_form_are_refused_in_one_short_line(key):
    """Each number key, each malformed or huge value: a RequestError (HTTP 400) of one line quoting at most
    QUOTE_CHARS characters of the value; never a ValueError (HTTP 500) from `int()` past 4,300 digits."""
    prefix = "sampler=ddim&" if key == "steps" else ""
    for value in NUMBERS + (["nan", "inf", "9" * 400] if key == "guidance" else []):
        if key == "guidance" and value in ("1_000", "1e3", "+1", "\uff11", "\u0663", "1" * 20, "0" * 5000 + "1"):
            continue  # float() reads these; the bounds decide
        with pytest.raises(RequestError) as refused:
            parse(f"{prefix}{key}={value}", conditional=True)
        message = str(refused.value)
        assert "\n" not in message and len(message) < 250, (key, value[:50], message)
        assert len(value) <= QUOTE_CHARS or value[:QUOTE_CHARS + 1] not in message, (key, value[:50], message)


def test_no_refusal_quotes_more_than_a_few_dozen_characters_of_its_input():
    long = "x" * 20_000
    for query in [f"sampler={long}", f"format={long}", f"{long}=1", f"guidance={long}", f"n={long}",
                  f"seed={'7' * 20_000}"]:
        with pytest.raises(RequestError) as refused:
            parse(query, conditional=True)
        message = str(refused.value)
        assert len(message) < 250 and "x" * (QUOTE_CHARS + 1) not in message and "7" * (QUOTE_CHARS + 1) not in \
            message, message


def test_defaults_are_the_models_own_recipe_within_the_caps():
    cfg = smoke(False)  # smoke samples with DDPM over T = 20
    assert default_sampler(cfg, Limits(max_steps=20)) == ("ddpm", 20)
    assert default_sampler(cfg, Limits(max_steps=19)) == (FALLBACK_SAMPLER, min(cfg.sample.steps, 19))
    request = parse("")
    assert (request.n, request.seed, request.sampler, request.steps, request.digit, request.format) == \
        (min(DEFAULT_IMAGES, LIMITS.max_images), 99, FALLBACK_SAMPLER, cfg.sample.steps, None, "png")
    # A URL's '+' arrives as a space; no sampler name has one.
    assert parse("sampler=dpm  2m-sde&steps=3&digit=4&seed=0&format=json", True).sampler == "dpm++2m-sde"


def near(drawn: np.ndarray, alone: np.ndarray) -> bool:
    """Equal but for rounding: drawn in a batch with other requests, an image may differ from the same request
    drawn alone by one uint8 level in a few pixels (the network's float sums depend on the batch size on a CPU;
    seen: 1 pixel in about 1 answer of 25 under load). The noise and labels themselves never change."""
    difference = np.abs(drawn.astype(int) - alone.astype(int))
    return drawn.shape == alone.shape and difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_a_batch_draws_each_request_as_it_would_be_drawn_alone():
    """One sampler call per setting over several requests' noise and labels gives each request the images it
    gets alone (to a rounding level: `near`)."""
    cfg = smoke(True)
    torch.manual_seed(0)
    model, diffusion = load_model_from(cfg), GaussianDiffusion.from_config(cfg.diffusion)
    requests = [GenerateRequest(n=3, seed=1, sampler="ddim", steps=3, guidance=1.0, digit=None),
                GenerateRequest(n=2, seed=2, sampler="dpm++2m", steps=2, guidance=1.0, digit=7),
                GenerateRequest(n=1, seed=3, sampler="ddim", steps=3, guidance=1.0, digit=5)]
    together = generate(model, diffusion, cfg, requests)
    for request, (images, labels) in zip(requests, together, strict=True):
        alone, alone_labels = generate(model, diffusion, cfg, [request])[0]
        assert near(images, alone) and labels == alone_labels
    assert together[0][1] == labels_for(0, 3, cfg.unet).tolist() and together[1][1] == [7, 7]


def test_a_request_that_fails_while_drawing_fails_alone():
    """A request that raises inside the sampler call (here a label outside the model's embedding, which
    parse_generate would refuse) gets its exception; the requests batched with it get their images."""
    cfg = smoke(True)
    torch.manual_seed(0)
    model, diffusion = load_model_from(cfg), GaussianDiffusion.from_config(cfg.diffusion)
    good = [GenerateRequest(n=2, seed=s, sampler="ddim", steps=2, guidance=1.0, digit=3) for s in (1, 2)]
    bad = GenerateRequest(n=1, seed=3, sampler="ddim", steps=2, guidance=1.0, digit=12)
    answers = generate_each(model, diffusion, cfg, [good[0], bad, good[1]])
    assert isinstance(answers[1], IndexError)
    for request, answer in zip(good, (answers[0], answers[2]), strict=True):
        assert near(answer[0], generate(model, diffusion, cfg, [request])[0][0]) and answer[1] == [3, 3]


def test_one_sampler_call_draws_at_most_the_cap():
    from flows.model_requests import _calls

    requests = [GenerateRequest(n=n, seed=i, sampler="ddim", steps=2, guidance=1.0, digit=None)
                for i, n in enumerate((3, 3, 3, 8))]
    assert _calls(requests, 6) == [[0, 1], [2], [3]] and _calls(requests, None) == [[0, 1, 2, 3]]
    cfg = smoke(False)
    model, diffusion = load_model_from(cfg), GaussianDiffusion.from_config(cfg.diffusion)
    split, whole = generate(model, diffusion, cfg, requests, 6), generate(model, diffusion, cfg, requests)
    assert all(near(a[0], b[0]) for a, b in zip(split, whole, strict=True))


def serve_refusal(*args: str) -> tuple[int, list[str], float]:
    """`ddpm serve ARGS` run to its end: exit status, stderr lines, seconds."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    done = subprocess.run([str(DDPM), "serve", *args], env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr.splitlines(), time.monotonic() - start


@pytest.mark.system  # runs the service's command, which must refuse before Ray starts
def test_bad_serve_flags_and_uris_are_refused_in_one_line_before_ray_starts():
    port = str(free_ports(1)[0])
    status, lines, took = serve_refusal("--port", port, "--mlflow", "bogus://x")
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: --mlflow") and "'bogus://x'" in lines[0]
    assert took < 60, took  # a Ray start and its 281 lines took 28 s
    # A host that is not loopback: one warning naming the token, then (here) the refusal of the URI.
    status, lines, _ = serve_refusal("--host", "0.0.0.0", "--port", port, "--mlflow", "bogus://x")
    assert status == 2 and len(lines) == 2 and lines[0].startswith("warning: --host 0.0.0.0 is not loopback")
    assert "--token" in lines[0] and lines[1].startswith("error: --mlflow")


def test_each_bad_serve_flag_is_refused_in_one_line(capsys, tmp_path):
    """In-process (the checks above, without a new interpreter each): no Ray is started by any of them."""
    import ray

    from flows.cli import main

    port = str(free_ports(1)[0])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = str(busy.getsockname()[1])
        for args, says in [(("--host", "no.such.host.invalid"), "--host"), (("--token", "short"), "16 visible"),
                           (("--mlflow", "sqlite://relative.db"), "not a SQLite file"),
                           (("--mlflow", "ftp://x"), "not a registry"), (("--max-queued", "0"), "[1, 512]"),
                           (("--timeout-s", "nan"), "--timeout-s"), (("--port", taken), "cannot listen there")]:
            assert main(["serve", "--port", port, "--runs-dir", str(tmp_path), *args]) == 2, args
            lines = capsys.readouterr().err.splitlines()
            assert len(lines) == 1 and says in lines[0], (args, lines)
    assert not ray.is_initialized() and not list(tmp_path.iterdir())  # no Ray, no store created


def load_model_from(cfg):
    from ddpm.models import build_unet

    model = build_unet(cfg.unet, cfg.diffusion.timesteps)
    torch.nn.init.normal_(model.final.weight, std=0.2)  # untrained, it predicts zero noise for every label
    return model.eval()


def test_a_failing_poll_keeps_the_current_model(tmp_path, capsys):
    """MLflow going away: the follower keeps its model and says so in one line, and one more when it is back."""
    from mlflow.tracking import MlflowClient

    from flows.model_service import Follower

    uri, versions = register_versions(tmp_path, [("smoke", False, 1)])
    follower = Follower(uri, poll_s=3600, device=torch.device("cpu"))
    assert follower.current is None and follower.problem is None  # no alias yet: no champion, no failure
    assert follower.client is not None
    set_champion(uri, versions[0])
    follower.poll()
    assert follower.current.version == versions[0]
    capsys.readouterr()
    reachable, follower.client = follower.client, MlflowClient(f"http://127.0.0.1:{free_ports(1)[0]}")
    follower.poll()
    follower.poll()
    lines = capsys.readouterr().out.splitlines()
    assert follower.current.version == versions[0] and len(lines) == 1 and "still serving v1" in lines[0]
    follower.client = reachable
    follower.poll()
    assert follower.problem is None and "works again" in capsys.readouterr().out
    missing = tmp_path / "elsewhere" / "mlflow.db"  # a store not created yet is not created by the service
    assert Follower(f"sqlite:///{missing}", 3600, torch.device("cpu")).current is None and not missing.exists()


def test_with_no_version_that_loads_the_follower_says_why(tmp_path):
    """The champion broken and no other version: nothing is served, and the reason names the version."""
    from flows.model_service import Follower, no_champion_message

    uri, versions = register_versions(tmp_path, [("smoke", False, 1)])
    break_artifact(uri, versions[0])
    set_champion(uri, versions[0])
    follower = Follower(uri, poll_s=3600, device=torch.device("cpu"))
    assert follower.current is None and follower.champion == "1" and follower.problem is None
    assert follower.stale.startswith("champion v1's model artifact cannot be loaded")
    message = no_champion_message(uri, follower.stale)
    assert message.startswith("nothing to serve: champion v1") and "\n" not in message and str(tmp_path) not in message


# -- one real service --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Served:
    service: Service
    uri: str
    versions: list[str]
    models: dict[str, tuple]  # version -> (model, cfg, diffusion), loaded from the registered files
    before_champion: dict[str, tuple[int, bytes]]  # what /health and /generate said with no champion yet

    def use(self, version: str) -> None:
        set_champion(self.uri, version)
        self.service.wait_for_version(version)

    def expected(self, version: str, seed: int, n: int, sampler: str, steps: int, digit: int | None = None,
                 guidance: float | None = None) -> np.ndarray:
        """What `run_sampler` draws locally for this request: the reference the service must match."""
        model, cfg, diffusion = self.models[version]
        sample = dataclasses.replace(cfg.sample, sampler=sampler, steps=steps,
                                     guidance_scale=cfg.sample.guidance_scale if guidance is None else guidance)
        labels = None
        if cfg.unet.num_classes:
            labels = torch.full((n,), digit) if digit is not None else labels_for(0, n, cfg.unet)
        noise = make_noise(cfg.sample.noise, image_seeds(seed, 0, n), (1, 28, 28))
        images = run_sampler(model, diffusion, dataclasses.replace(cfg, sample=sample), noise, labels).images
        return model_to_uint8(images)[:, 0].numpy()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("serve")
    uri, versions = register_versions(root, [("smoke", False, 1), ("smoke", True, 2)])
    service = Service.start(uri, free_ports(1)[0], root / "serve.log", "--poll-s", "1")
    try:
        before = {path: get(service.url + path)[::2] for path in ("/health", "/generate?n=1")}
        models = {}
        for i, version in enumerate(versions):
            model, cfg = load_model(root / f"v{i + 1}" / "model.pt")
            models[version] = (model, cfg, GaussianDiffusion.from_config(cfg.diffusion))
        result = Served(service, uri, versions, models, before)
        result.use(versions[0])
        yield result
    finally:
        service.stop()


def test_without_a_champion_the_service_says_how_to_get_one(served):
    health = json.loads(served.before_champion["/health"][1])
    assert served.before_champion["/health"][0] == 200 and health["status"] == "no champion"
    assert health["version"] is None
    status, body = served.before_champion["/generate?n=1"]
    assert status == 503 and body.decode().strip() == \
        f"no champion registered in {served.uri} yet: run the pipeline (`make run`)"


def test_health_and_version_name_the_champion(served):
    served.use("1")
    assert served.service.health()["status"] == "ready" and served.service.health()["version"] == "1"
    version = get_json(served.service.url + "/version")
    assert version == {"version": "1", "model": "mnist-ddpm-unet", "conditional": False, "fld": "10.0",
                       "model_epoch": "1", "profile": "smoke", "timesteps": 20, "device": "cpu",
                       "tracking_uri": served.uri}
    # HTTP and every other port of the service's process tree (Ray's, and the replica's internal gRPC server that
    # Ray Serve 2.60 would open on [::]) listen on loopback only.
    listening = listeners_of(descendants(served.service.process.pid))
    exposed = [(Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0], address) for pid, address, _ in listening
               if not is_loopback(address)]
    assert listening and not exposed, exposed
    assert int(served.service.url.rsplit(":", 1)[1]) in {port for _, _, port in listening}


def test_png_grid_is_the_requested_images(served):
    from PIL import Image

    served.use("1")
    status, headers, body = get(served.service.url + "/generate?n=5&sampler=ddim&steps=2&seed=11")
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-model-version"] == "1"
    picture = np.array(Image.open(io.BytesIO(body)))
    expected = grid(served.expected("1", 11, 5, "ddim", 2))  # 3 columns, 2 rows, 2-pixel gaps
    assert picture.shape == expected.shape == (2 * 30 + 2, 3 * 30 + 2) and np.array_equal(picture, expected)


@pytest.mark.parametrize("sampler,steps", [("ddim", 3), ("dpm++2m-sde", 4), ("ddpm", None)])
def test_json_images_equal_local_sampling(served, sampler, steps):
    served.use("1")
    query = f"n=3&seed=5&format=json&sampler={sampler.replace('+', '%2B')}" + (f"&steps={steps}" if steps else "")
    answer = get_json(served.service.url + "/generate?" + query)
    T = served.models["1"][1].diffusion.timesteps
    assert (answer["version"], answer["seed"], answer["sampler"], answer["steps"], answer["labels"]) == \
        ("1", 5, sampler, steps or T, None)
    assert np.array_equal(np.array(answer["images"], dtype=np.uint8),
                          served.expected("1", 5, 3, sampler, steps or T))


def test_a_conditional_champion_draws_the_digit_asked_for(served):
    served.use("2")
    url = served.service.url + "/generate?format=json&sampler=ddim&steps=3&seed=8&n=4"
    for digit, guidance in ((3, None), (None, None), (6, 2.5)):
        query = (f"&digit={digit}" if digit is not None else "") + (f"&guidance={guidance}" if guidance else "")
        answer = get_json(url + query)
        labels = [digit] * 4 if digit is not None else labels_for(0, 4, served.models["2"][1].unet).tolist()
        assert answer["version"] == "2" and answer["labels"] == labels and answer["digit"] == digit
        assert np.array_equal(np.array(answer["images"], dtype=np.uint8),
                              served.expected("2", 8, 4, "ddim", 3, digit, guidance))
    a_digit = get_json(url + "&digit=3")["images"]
    assert a_digit != get_json(url + "&digit=4")["images"]  # the label reaches the network


def test_each_refusal_over_http_is_one_line(served):
    served.use("1")
    for query, status, says in [("n=0", 400, "[1, 64]"), ("sampler=euler", 400, ", ".join(SAMPLERS)),
                                ("sampler=ddim&steps=101", 400, "[1, 20]"), ("digit=3", 400, "unconditional"),
                                ("seed=x", 400, "whole number"), ("n=1&colour=red", 400, "unknown query key")]:
        code, headers, body = get(served.service.url + "/generate?" + query)
        text = body.decode()
        assert code == status and says in text and text.count("\n") == 1, (query, code, text)
        assert headers["x-model-version"] == "1"
    code, _, body = get(served.service.url + "/no/such/page")
    assert code == 404 and body.decode().count("\n") == 1 and "/generate" in body.decode()


def test_the_page_draws_a_grid_in_a_browser(served, tmp_path):
    from playwright.sync_api import sync_playwright

    served.use("1")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(served.service.url + "/")
            assert page.locator("#digit-label").is_hidden()  # v1 is unconditional
            # A first-time visitor sees a grid at once, the FLD rounded, and 28-pixel digits scaled up, pixelated.
            page.wait_for_function("document.getElementById('grid').naturalWidth > 0", timeout=60_000)
            natural = page.evaluate("document.getElementById('grid').naturalWidth")
            shown = page.evaluate("document.getElementById('grid').getBoundingClientRect().width")
            assert natural == 4 * 30 + 2 and shown % natural == 0 and shown // natural >= 2, (natural, shown)
            assert page.evaluate("getComputedStyle(document.getElementById('grid')).imageRendering") == "pixelated"
            assert "FLD 10.00," in page.inner_text("body") and page.locator("#grid").is_visible()
            served.use("2")
            page.reload()
            page.wait_for_function("document.getElementById('status').textContent.startsWith('drawn by v2')",
                                   timeout=60_000)  # the grid drawn on load, before the visitor's own
            page.select_option("select[name=digit]", "7")
            page.select_option("#sampler", "dpm++2m")
            page.fill("#steps", "3")
            page.fill("input[name=n]", "4")
            page.click("#generate")
            page.wait_for_function("document.getElementById('grid').naturalWidth === 2 * 30 + 2", timeout=60_000)
            assert page.inner_text("#version") == "v2" and "drawn by v2" in page.inner_text("#status")
            page.screenshot(path=str(tmp_path / "page.png"))
            page.select_option("#sampler", "ddim")
            page.fill("#steps", "500")  # over the model's 20 timesteps: the service's refusal shows on the page
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').className === 'error'")
            assert page.inner_text("#status").startswith("error: steps=500 must be in [1, 20]")
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 0


def test_a_bad_request_among_good_ones_fails_alone(served):
    """Six good requests and one with a 5,000-digit seed, sent at the same moment: six images, one 400."""
    served.use("1")
    queries = [f"n=2&seed={i}&sampler=ddim&steps=3&format=json" for i in range(6)] + [f"n=2&seed={'9' * 5000}"]
    with ThreadPoolExecutor(len(queries)) as pool:
        answers = list(pool.map(lambda q: get(f"{served.service.url}/generate?{q}"), queries))
    for i, (status, _, body) in enumerate(answers[:6]):
        assert status == 200 and near(np.array(json.loads(body)["images"], dtype=np.uint8),
                                      served.expected("1", i, 2, "ddim", 3))
    status, _, body = answers[6]
    assert status == 400 and body.decode().count("\n") == 1 and "9" * (QUOTE_CHARS + 1) not in body.decode()


def test_head_draws_nothing(served):
    served.use("1")
    before = served.service.health()
    start = time.monotonic()
    status, headers, body = get(f"{served.service.url}/generate?n=64&sampler=ddim&steps=20", method="HEAD")
    assert status == 200 and body == b"" and headers["content-type"] == "image/png"
    assert headers["x-model-version"] == "1" and time.monotonic() - start < 2
    assert get(f"{served.service.url}/generate?n=0", method="HEAD")[0] == 400  # still checked
    after = served.service.health()
    assert (after["requests"], after["batch_sizes"]) == (before["requests"], before["batch_sizes"])


def test_load_while_the_champion_moves(served):
    """200 requests from 16 clients; after 50 answers the alias moves v1 -> v2, and the last 100 requests start
    only once the service says v2. Every answer is whole and names a version whose images it holds."""
    served.use("1")
    total, switch_after, gate = 200, 50, 100
    next_job, done, lock = itertools.count(), [], threading.Lock()
    moved, enough = threading.Event(), threading.Event()

    def job(i: int) -> dict:
        sampler, steps = ("ddim", 3) if i % 2 else ("dpm++2m", 2)
        fmt = "json" if i % 3 else "png"
        status, headers, body = get(f"{served.service.url}/generate?n=2&seed={i}&sampler={sampler.replace('+', '%2B')}"
                                    f"&steps={steps}&format={fmt}")
        return {"i": i, "status": status, "version": headers.get("x-model-version"), "body": body, "fmt": fmt,
                "sampler": sampler, "steps": steps}

    def client() -> list[dict]:
        answers = []
        while (i := next(next_job)) < total:
            if i >= gate:
                moved.wait(120)
            answers.append(job(i))
            with lock:
                done.append(i)
                if len(done) >= switch_after:
                    enough.set()
        return answers

    with ThreadPoolExecutor(16) as pool:
        clients = [pool.submit(client) for _ in range(16)]
        assert enough.wait(120)
        served.use("2")  # moves the alias, then waits for /health to say v2 while the clients go on
        moved.set()
        per_client = [c.result() for c in clients]
    answers = sorted((a for answers in per_client for a in answers), key=lambda a: a["i"])
    assert [a["i"] for a in answers] == list(range(total)) and all(a["status"] == 200 for a in answers)
    changed = 0
    for a in answers:
        if a["fmt"] == "json":
            assert json.loads(a["body"])["version"] == a["version"]
            drawn = np.array(json.loads(a["body"])["images"], dtype=np.uint8)
            expected = served.expected(a["version"], a["i"], 2, a["sampler"], a["steps"])
        else:
            from PIL import Image

            drawn = np.array(Image.open(io.BytesIO(a["body"])))
            expected = grid(served.expected(a["version"], a["i"], 2, a["sampler"], a["steps"]))
        assert near(drawn, expected), a["i"]
        changed += int(not np.array_equal(drawn, expected))
    versions = [a["version"] for a in answers]
    assert set(versions) == {"1", "2"} and versions.count("1") >= switch_after
    assert all(a["version"] == "2" for a in answers if a["i"] >= gate)
    for answers_of_one in per_client:  # one replica: once a client has seen v2, it never sees v1 again
        seen = [a["version"] for a in answers_of_one]
        assert seen == sorted(seen), seen
    print(f"\n{changed} of {total} answers off by one level somewhere; batch sizes (requests: batches): "
          f"{served.service.health()['batch_sizes']}")


def test_sigterm_stops_the_service_and_its_ray(served):
    tree = descendants(served.service.process.pid)  # Ray's processes included
    assert len(tree) > 3
    assert served.service.stop() == 0, Path(served.service.log).read_text()[-3000:]
    log = Path(served.service.log).read_text()
    assert "stopped: the app is deleted" in log and "Traceback" not in log, log[-3000:]
    alive = [pid for pid in tree if os.path.exists(f"/proc/{pid}")
             and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"]
    assert not alive, [Path(f"/proc/{pid}/cmdline").read_text() for pid in alive]


# -- a second service: started on a broken champion, with a queue of one, a short timeout and a token ----------

TOKEN = "t0ken-for-the-tests-" + "x" * 8
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BIG = 256  # images of a request that keeps the replica busy for seconds (DDPM over smoke's 20 steps)


def break_artifact(uri: str, version: str) -> None:
    """Truncate version `version`'s registered model.pt in the artifact store, as a failed upload would."""
    from urllib.parse import urlsplit

    from mlflow.tracking import MlflowClient

    from flows.tracking import UNET_MODEL

    source = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri(UNET_MODEL, version)
    found = list(Path(urlsplit(source).path).rglob("model.pt"))
    assert found, source
    for path in found:
        path.write_bytes(path.read_bytes()[:100])


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Service:
    root = tmp_path_factory.mktemp("guarded")
    uri, versions = register_versions(root, [("smoke", False, 1), ("smoke", True, 2), ("smoke", False, 3)])
    break_artifact(uri, versions[2])
    set_champion(uri, versions[2])
    service = Service.start(uri, free_ports(1)[0], root / "serve.log", "--poll-s", "1", "--max-queued", "1",
                            "--timeout-s", "3", "--max-images", str(BIG), env={"DDPM_SERVE_TOKEN": TOKEN})
    service.uri = uri
    try:
        yield service
    finally:
        assert service.stop() == 0


def test_a_replica_started_on_a_broken_champion_serves_the_newest_version_that_loads(guarded):
    health = guarded.health()
    assert (health["status"], health["version"], health["champion"]) == ("stale", "2", "3"), health
    assert health["stale"].startswith("champion v3's model artifact cannot be loaded")
    assert "ddpm-serve-" not in health["stale"] and "delete it" not in health["stale"], health["stale"]
    status, headers, _ = get(guarded.url + "/generate?n=1&sampler=ddim&steps=2", headers=AUTH)
    assert status == 200 and headers["x-model-version"] == "2"
    page = get(guarded.url + "/")[2].decode()
    assert "<b id=version>v2</b>" in page and "Not the champion: champion v3" in page
    set_champion(guarded.uri, "1")  # a loadable champion: served, and no longer stale
    guarded.wait_for_version("1")
    assert guarded.health()["status"] == "ready" and guarded.health()["stale"] is None
    set_champion(guarded.uri, "3")  # broken again, while serving: v1 stays in service
    deadline = time.monotonic() + 30
    while guarded.health()["status"] != "stale":
        assert time.monotonic() < deadline, guarded.health()
        time.sleep(0.2)
    assert (guarded.health()["version"], guarded.health()["champion"]) == ("1", "3")
    assert get(guarded.url + "/generate?n=1&sampler=ddim&steps=2", headers=AUTH)[1]["x-model-version"] == "1"


def test_with_a_token_generate_needs_it_and_health_never(guarded):
    for headers in ({}, {"Authorization": "Bearer wrong-token-of-enough-length"}, {"Authorization": TOKEN}):
        status, answer_headers, body = get(guarded.url + "/generate?n=1&sampler=ddim&steps=2", headers=headers)
        assert status == 401 and answer_headers["www-authenticate"] == "Bearer" and body.decode().count("\n") == 1
        assert get(guarded.url + "/version", headers=headers)[0] == 401
    assert get(guarded.url + "/health")[0] == 200 and get(guarded.url + "/")[0] == 200
    assert get(guarded.url + "/generate?n=1&sampler=ddim&steps=2", headers=AUTH)[0] == 200


def test_the_page_asks_for_the_token_before_drawing(guarded, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(guarded.url + "/")
            assert page.locator("#token").is_visible() and page.locator("#grid").is_hidden()  # nothing drawn yet
            page.select_option("#sampler", "ddim")
            page.fill("#steps", "2")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').className === 'error'")
            assert page.inner_text("#status").startswith("this service needs its token")
            page.fill("#token", TOKEN)
            page.click("#generate")
            page.wait_for_function("document.getElementById('grid').naturalWidth > 0", timeout=60_000)
            assert "drawn by v" in page.inner_text("#status") and page.locator("#grid").is_visible()
        finally:
            browser.close()


def test_queue_bound_timeout_and_gone_clients(guarded):
    """A big request keeps the replica busy: it is answered 503 after --timeout-s (its batch goes on); the next
    request waits in the queue of one, and its client leaves; one more is refused at once with Retry-After. The
    request whose client left is never drawn; /health answers at once throughout."""
    before = guarded.health()["requests"]
    big = ThreadPoolExecutor(1).submit(get, f"{guarded.url}/generate?n={BIG}&seed=1", 60, AUTH)
    deadline = time.monotonic() + 30
    while guarded.health()["drawing"] == 0:  # the big request's batch has started
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sent = time.monotonic()
    with pytest.raises(TimeoutError):  # this client leaves while its request waits in the queue
        get(f"{guarded.url}/generate?n=1&seed=2&sampler=ddim&steps=2", 0.5, AUTH)
    while guarded.health()["queued"]:  # Serve cancels it: it leaves the queue before its 3 s timeout
        assert time.monotonic() - sent < 2.5, guarded.health()
        time.sleep(0.05)
    start = time.monotonic()
    assert guarded.health()["drawing"] == 1 and time.monotonic() - start < 1  # /health answers at once
    waiting = ThreadPoolExecutor(1).submit(get, f"{guarded.url}/generate?n=1&seed=3&sampler=ddim&steps=2", 60, AUTH)
    while guarded.health()["queued"] == 0:
        time.sleep(0.05)
    start = time.monotonic()
    status, headers, body = get(f"{guarded.url}/generate?n=1&seed=4&sampler=ddim&steps=2", headers=AUTH)
    assert status == 503 and time.monotonic() - start < 1 and int(headers["retry-after"]) >= 1, (status, body)
    assert body.decode().startswith("busy: 1 requests are waiting (--max-queued)")
    status, headers, body = big.result()
    assert status == 503 and "--timeout-s 3" in body.decode() and int(headers["retry-after"]) >= 1
    status, _, _ = waiting.result()  # drawn after the big batch, or timed out behind it: never a hang
    assert status in (200, 503)
    while guarded.health()["drawing"] or guarded.health()["queued"]:
        time.sleep(0.1)
    after = guarded.health()["requests"]
    grew = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    assert grew["busy"] == 1 and grew["gone"] >= 1 and grew["timed out"] >= 1, grew
    assert grew["drawn"] == (2 if status == 200 else 1), grew  # the big one (and the waiting one), never the gone
