"""Browser tests of `estlora ui`: Playwright drives Debian's Chromium (headless) against the app on the toy model.

The app runs in this process on 127.0.0.1 and a free port. Screenshots go to test-artifacts/ui/ at the
repository root. Without Chromium, Playwright or Gradio the browser tests are skipped, except in CI
(CI set), where they must run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from estlora.toy.model import DEMO_PAIR, toy_lora_path
from estlora.toy.world import STYLES

SUBJECT, STYLE = (f"toy:{name}" for name in DEMO_PAIR)  # the page's defaults: the demo's pair
OTHER_STYLE = f"toy:{next(s for s in STYLES if s != DEMO_PAIR[1])}"

CHROMIUM = "/usr/bin/chromium"
# Flags for this closed, loopback-only network (no sandbox as root, no background calls home).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"
STEPS = "3"
TIMEOUT_MS = 120_000
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before anything imports gradio: no calls home


def _missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} not found (apt-get install chromium)"
    for module in ("playwright", "gradio"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} not installed (pip install -e '.[dev,ui]')"
    return None


MISSING = _missing()
if MISSING is None:
    from playwright.sync_api import Page, expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)


def test_ui_without_gradio_says_how_to_install(monkeypatch):
    from estlora import ui
    from estlora.errors import EstloraError

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(EstloraError, match=r"pip install 'estlora\[ui\]'"):
        ui.launch()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_auth_is_read_from_the_flag_or_a_file(tmp_path):
    from estlora.errors import SettingError
    from estlora.ui import read_auth

    assert read_auth(None) is None and read_auth("ann:s3:cret") == [("ann", "s3:cret")]
    logins = tmp_path / "logins.txt"
    logins.write_text("# who may render\nann:secret\n\nbob:hunter2\n")
    assert read_auth(str(logins)) == [("ann", "secret"), ("bob", "hunter2")]
    for bad in ("password-only", ":secret", "ann:"):
        with pytest.raises(SettingError, match="expects user:password") as info:
            read_auth(bad)
        assert bad.strip(":") not in str(info.value)  # a mistyped password is never echoed


def test_open_to_the_network_warns_and_auth_asks_for_a_login(tmp_path, monkeypatch, capsys):
    """--host 0.0.0.0 says so on the console; with --auth the page and its API answer only after a login."""
    import http.cookiejar
    import urllib.error
    import urllib.parse
    import urllib.request

    from estlora import ui

    assert ui.network_warning("127.0.0.1", 7860, None) is None and ui.network_warning("localhost", 1, None) is None
    assert "open to the network on 0.0.0.0:7860" in ui.network_warning("0.0.0.0", 7860, None)
    assert "--auth user:password" in ui.network_warning("0.0.0.0", 7860, None)
    assert "asks for one of 1 logins" in ui.network_warning("0.0.0.0", 7860, [("a", "b")])
    monkeypatch.setenv(ui.OUT_ENV, str(tmp_path / "out"))
    app = ui.launch(None, "127.0.0.1", free_port(), block=False, auth=[("ann", "secret")])
    try:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(app.local_url + "config")
        assert refused.value.code == 401
        for password, status in (("wrong", 400), ("secret", 200)):
            data = urllib.parse.urlencode({"username": "ann", "password": password}).encode()
            try:
                code = opener.open(app.local_url + "login", data=data).status
            except urllib.error.HTTPError as exc:
                code = exc.code
            assert code == status
        assert opener.open(app.local_url + "config").status == 200
    finally:
        app.close()


@pytest.fixture(scope="module")
def ui_app(tmp_path_factory):
    """(the page's address, its output folder)."""
    from estlora import ui

    out = tmp_path_factory.mktemp("ui-outputs")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ui.OUT_ENV, str(out))
        env.setenv(ui.MAX_UPLOAD_ENV, "2")  # MiB: the toy LoRAs (0.1 MB) fit, the "too large" file does not
        app = ui.launch(None, "127.0.0.1", free_port(), block=False)
        yield app.local_url, out
        app.close()


@pytest.fixture(scope="module")
def app_url(ui_app):
    return ui_app[0]


@pytest.fixture(scope="module")
def browser():
    if MISSING is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests must run in CI: {MISSING}", pytrace=False)
        pytest.skip(MISSING)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url) -> Page:
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app_url)
    page.locator("#generate").wait_for()
    set_number(page, "#steps", STEPS)
    yield page
    page.close()


def set_number(page: Page, component: str, value: str) -> None:
    field = page.locator(f"{component} input[type=number]")
    field.fill(value)
    field.press("Enter")


def shot(page: Page, name: str) -> None:
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def upload(page: Page, role: str, path: Path) -> None:
    page.locator(f"#{role}-file input[type=file]").set_input_files(path)


def clear_upload(page: Page, role: str) -> None:
    page.locator(f"#{role}-file button[aria-label='Clear']").click()
    expect(page.locator(f"#{role}-choice input")).to_have_value({"subject": SUBJECT, "style": STYLE}[role])


def expect_error(page: Page, text: str) -> None:
    toast = page.locator(".toast-body", has_text=text)
    expect(toast).to_be_visible()
    toast.locator(".toast-close").click()


def png_settings(page: Page, src: str) -> dict:
    """The `estlora` text chunk of the PNG as the browser downloads it (the settings survive serving)."""
    from PIL import Image

    image = Image.open(io.BytesIO(page.request.get(src).body()))
    return json.loads(image.text["estlora"])


def test_load_generate_shows_image_beta_and_heatmap(page):
    outside = []  # the page fetches nothing beyond this machine (no web fonts, no calls home)
    page.on("request", lambda request: outside.append(request.url) if "127.0.0.1" not in request.url else None)
    page.reload()
    page.locator("#generate").wait_for()
    set_number(page, "#steps", STEPS)
    page.locator("#load").click()
    expect(page.locator("#lora-info")).to_contain_text("Both LoRAs fit the toy SDXL")
    expect(page.locator("#lora-info")).to_contain_text(SUBJECT)
    expect(page.locator("#lora-info")).to_contain_text(STYLE)

    page.locator("#generate").click()
    image = page.locator("#gallery img")
    expect(image).to_have_count(1)
    expect(image).to_have_attribute("alt", "est · seed 0")
    expect(page.locator("#heatmaps img").first).to_be_visible()
    expect(page.locator("#result")).to_contain_text("beta = ")
    expect(page.locator("#result")).to_contain_text("measured")
    expect(page.locator("#plan-summary")).to_contain_text("method est, 3 steps")
    expect(page.locator("#files a[href$='-est-seed0.json']")).to_have_count(1)
    shot(page, "generate")
    # the plan at its own size, not shrunk into a cell (its labels legible), and a link to its file
    plan = page.locator("#heatmaps img").first
    natural, shown = plan.evaluate("e => [e.naturalWidth, e.clientWidth]")
    assert natural >= 600 and shown >= natural
    expect(page.locator("#heatmaps a").first).to_have_attribute("href", re.compile(r"-plan-est\.png$"))
    # the heading in the system's font (a web font drew "LoRA" with a small-cap "A"), nothing fetched
    font = page.locator("#title h1").evaluate("e => getComputedStyle(e).fontFamily")
    assert font.startswith("ui-sans-serif") and "Source Sans" not in font
    assert outside == []
    # the result whole and enlarged without blur (toy images are 32 px), not stretched into a clipped pane
    assert image.evaluate("e => getComputedStyle(e).objectFit") == "contain"
    assert image.evaluate("e => getComputedStyle(e).imageRendering") == "pixelated"
    assert image.bounding_box()["width"] >= 128

    meta = png_settings(page, image.get_attribute("src"))
    assert meta["settings"]["method"] == "est" and meta["settings"]["steps"] == 3
    assert meta["beta_source"] == "measured" and meta["command"].startswith("estlora generate")
    assert "--base toy" in meta["command"] and "--method est" in meta["command"]
    assert f"--subject {SUBJECT}" in meta["command"] and "--route attention" in meta["command"]  # resolved


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("#steps", "0", "steps: must be at least 1, not 0"),
        ("#steps", "2.5", "steps: must be a whole number, not 2.5"),
        # the browser's number box holds 2**64 as a double, and sends it as 18446744073709552000
        ("#seed", str(2**64), "seed: must be at most 9223372036854775807, not 18446744073709552000"),
    ],
    ids=["steps-0", "steps-fraction", "seed-overflow"],
)
def test_a_value_out_of_range_is_named_never_changed(page, field, value, words):
    """What is typed stays as typed (no slider clamps it, no rounding), and Generate answers with the
    field and its range, from the settings' own declaration."""
    set_number(page, field, value)
    if field == "#steps":
        expect(page.locator(f"{field} input[type=number]")).to_have_value(value)
    page.locator("#generate").click()
    expect_error(page, words)
    expect(page.locator(".toast-body", has_text="&#x27;")).to_have_count(0)


def test_dice_draws_a_seed_and_ctrl_enter_generates(page):
    """The dice puts a random seed in the seed box (so it is seen, and saved with the image), and
    Ctrl+Enter in the prompt generates, as in A1111 and ComfyUI."""
    seed = page.locator("#seed input[type=number]")
    page.locator("#random-seed").click()
    expect(seed).not_to_have_value("0")
    drawn = seed.input_value()
    page.locator("#prompt textarea").press("Control+Enter")
    image = page.locator("#gallery img")
    expect(image).to_have_count(1)
    expect(image).to_have_attribute("alt", f"est · seed {drawn}")
    assert png_settings(page, image.get_attribute("src"))["settings"]["seed"] == int(drawn)


def test_a_png_made_here_loads_every_setting(page, tmp_path):
    """Dropping a PNG estlora wrote sets the page to its settings (its beta as a manual one)."""
    from estlora.cli import main

    words = ["generate", "--base", "toy", "--subject", SUBJECT, "--style", STYLE, "--prompt", "a sks shape"]
    assert main([*words, "--steps", "4", "--seed", "7", "--method", "klora", "--out", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*.png")
    page.locator("#settings-png input[type=file]").set_input_files(png)
    expect(page.locator("#lora-info")).to_contain_text(f"Loaded the settings of {png.name}.")
    expect(page.locator("#steps input[type=number]")).to_have_value("4")
    expect(page.locator("#seed input[type=number]")).to_have_value("7")
    expect(page.locator("#prompt textarea")).to_have_value("a sks shape")
    expect(page.locator("#method input[value=klora]")).to_be_checked()


def test_generate_and_its_progress_are_in_view_together(page):
    """At 1920 x 1080 the Generate button and the images pane (where progress and the result show) are
    both on screen without scrolling, beside the prompt."""
    page.set_viewport_size({"width": 1920, "height": 1080})
    page.evaluate("window.scrollTo(0, 0)")  # the fixture typed the steps further down
    for element in ("#prompt", "#generate", "#gallery"):
        box = page.locator(element).bounding_box()
        assert box["y"] >= 0 and box["y"] + min(box["height"], 60) <= 1080, element


def test_compare_methods_side_by_side(page):
    page.locator("#compare-methods label", has_text="klora").uncheck()
    page.locator("#compare-methods label", has_text="merge").check()
    page.locator("#compare-methods label", has_text="composite").check()  # LoRA Composite: two passes per step
    page.locator("#compare").click()
    images = page.locator("#gallery img")
    expect(images).to_have_count(3)
    captions = ["est · seed 0", "merge · seed 0", "composite · seed 0"]
    expect(page.locator("#gallery .caption-label")).to_have_text(captions)
    expect(page.locator("#result")).to_contain_text("merge: beta not used")
    shot(page, "compare")
    methods = [png_settings(page, images.nth(i).get_attribute("src"))["settings"]["method"] for i in range(3)]
    assert methods == ["est", "merge", "composite"]


def test_bad_uploads_show_their_error_and_the_app_keeps_working(page, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(1000))
    pickled = tmp_path / "renamed-pickle.safetensors"
    torch.save({"lora": torch.zeros(4)}, pickled)
    too_large = tmp_path / "too-large.safetensors"
    too_large.write_bytes(os.urandom(3 * 2**20))
    not_safetensors = tmp_path / "weights.bin"
    not_safetensors.write_bytes(os.urandom(100))

    panel = page.locator("#lora-info")
    upload(page, "subject", garbage)
    expect(page.locator(".toast-body", has_text="garbage.safetensors: not a safetensors file")).to_be_visible()
    page.screenshot(path=ARTIFACTS / "bad-upload.png")  # the viewport: where the message is pinned
    expect_error(page, "subject LoRA garbage.safetensors: not a safetensors file")
    # the LoRA panel says what is chosen now (never "Both LoRAs fit" under an error)
    expect(panel).to_contain_text("Not loaded: subject LoRA garbage.safetensors: not a safetensors file")
    expect(panel).not_to_contain_text("Both LoRAs fit")
    clear_upload(page, "subject")
    expect(panel).to_contain_text("Both LoRAs fit")  # the cleared upload: back to the built-in choice
    expect(panel).to_contain_text(SUBJECT)

    upload(page, "style", pickled)
    expect_error(page, "style LoRA renamed-pickle.safetensors: this is a pickle checkpoint")
    expect(panel).to_contain_text("Not loaded: style LoRA renamed-pickle.safetensors")
    clear_upload(page, "style")
    page.locator("#style-choice input").click()  # a dropdown change re-checks the pair too
    page.locator("li[role=option]", has_text=OTHER_STYLE).click()
    expect(panel).to_contain_text(OTHER_STYLE)
    expect(panel).not_to_contain_text(STYLE)

    upload(page, "subject", too_large)  # refused by the browser: nothing is uploaded, nothing changes
    expect_error(page, "exceed the maximum allowed size")
    expect(page.locator("#subject-choice input")).to_have_value(SUBJECT)

    upload(page, "subject", not_safetensors)
    expect_error(page, "Only .safetensors allowed")

    # Still alive: a good upload loads, and a render with it succeeds.
    mine = tmp_path / "my-subject.safetensors"
    shutil.copy(toy_lora_path("heart"), mine)
    upload(page, "subject", mine)
    expect(page.locator("#subject-choice input")).to_have_value("upload")
    expect(page.locator("#lora-info")).to_contain_text("my-subject.safetensors")
    page.locator("#method label", has_text="merge").click()
    page.locator("#generate").click()
    expect(page.locator("#gallery img")).to_have_attribute("alt", "merge · seed 0")
    shot(page, "after-bad-upload")


@pytest.mark.slow
def test_second_request_waits_in_the_queue(browser, page, app_url):
    other = browser.new_page(viewport={"width": 1400, "height": 1100})
    other.set_default_timeout(TIMEOUT_MS)
    other.goto(app_url)
    other.locator("#generate").wait_for()
    set_number(page, "#steps", "20")  # long enough for the second request to find the first still running
    for side in ("#width", "#height"):
        set_number(page, side, "256")  # a few seconds on the toy model
    set_number(other, "#steps", STEPS)
    page.locator("#method label", has_text="klora").click()
    page.locator("#generate").click()
    expect(page.locator("#gallery")).to_contain_text(re.compile(r"[1-9]\d*/20 steps"))  # the progress bar
    other.locator("#generate").click()
    expect(other.locator("#gallery")).to_contain_text("queue")
    shot(page, "progress")
    shot(other, "queued")
    expect(page.locator("#gallery img")).to_have_attribute("alt", "klora · seed 0")
    expect(other.locator("#gallery img")).to_have_attribute("alt", "est · seed 0")
    other.close()


def test_stop_ends_the_run_between_steps(page):
    """Stop ends this page's run at the next step, says so, and the app carries on."""
    set_number(page, "#steps", "40")
    for side in ("#width", "#height"):
        set_number(page, side, "256")
    page.locator("#method label", has_text="klora").click()  # no beta to measure first
    page.locator("#generate").click()
    expect(page.locator("#gallery")).to_contain_text(re.compile(r"[1-9]\d*/40 steps"))
    page.locator("#stop").click()
    expect_error(page, "stopped: the image in progress was not saved")
    for field, value in (("#steps", STEPS), ("#width", "32"), ("#height", "32")):
        set_number(page, field, value)
    page.locator("#generate").click()
    expect(page.locator("#gallery img")).to_have_attribute("alt", "klora · seed 0")


def test_a_stopped_run_saves_no_partial_image(tmp_path):
    """The image being rendered when Stop comes is not written; the pipeline is free for the next run."""
    from estlora.ui import Studio

    studio = Studio(None, tmp_path / "ui")
    page = {**dataclasses.asdict(studio.defaults.fusion), **dataclasses.asdict(studio.defaults.sampling)}
    page |= {"subject_choice": SUBJECT, "subject_file": None, "style_choice": STYLE, "style_file": None}
    page |= {"prompt": "a sks shape", "beta_mode": "manual", "beta": 0.5, "steps": 6}

    def progress(done, **_):  # the page's progress bar: Stop arrives after the second step
        if done[0] == 2:
            studio.stop("tab")

    studio.stop("tab")  # no run in progress: nothing to stop
    with pytest.raises(Exception, match="stopped: the image in progress was not saved"):
        studio.run(page, ["est"], 1, progress, owner="tab")
    assert not list((tmp_path / "ui").rglob("*.png"))
    images, *_ = studio.run(page, ["est"], 1, lambda *args, **kwargs: None, owner="tab")
    assert len(images) == 1


def test_an_upload_is_kept_with_the_outputs_once(tmp_path):
    """An uploaded LoRA is copied once per content beside the outputs; the images' settings and command
    name that copy, so they still work when Gradio's upload cache is gone."""
    from estlora.cli import main
    from estlora.ui import UPLOAD, Studio

    studio = Studio(None, tmp_path / "ui")
    upload = tmp_path / "gradio-cache" / "my-subject.safetensors"
    upload.parent.mkdir()
    shutil.copy(toy_lora_path("heart"), upload)
    page = {**dataclasses.asdict(studio.defaults.fusion), **dataclasses.asdict(studio.defaults.sampling)}
    page |= {"subject_choice": UPLOAD, "subject_file": str(upload), "style_choice": STYLE, "style_file": None}
    page |= {"prompt": "a sks shape", "beta_mode": "manual", "beta": 0.5, "steps": 2}
    for _ in range(2):
        images, *_ = studio.run(page, ["est"], 1, lambda *args, **kwargs: None)
    (kept,) = (tmp_path / "ui" / "loras").iterdir()
    assert kept.name.endswith("-my-subject.safetensors") and kept.read_bytes() == upload.read_bytes()
    meta = json.loads(Path(images[0][0]).with_suffix(".json").read_text())
    assert meta["settings"]["subject"] == str(kept) and str(kept) in meta["command"]
    shutil.rmtree(upload.parent)  # Gradio's cache cleared: the saved command still regenerates the image
    words = shlex.split(meta["command"])[1:] + ["--out", str(tmp_path / "again")]
    assert main(words) == 0


def test_ui_and_cli_give_the_same_beta_and_pixels(tmp_path, monkeypatch, capfd):
    """The same settings with a non-default sampler: the page and `estlora generate` measure the same
    beta (both probe under that sampler) and render the same pixels. Each measures afresh (own cache)."""
    from PIL import Image

    from estlora.cli import main
    from estlora.ui import Studio

    monkeypatch.setenv("ESTLORA_CACHE", str(tmp_path / "cli-cache"))
    prompt, chosen = "a sks shape in szn style", {"steps": 4, "scheduler": "euler-a", "seed": 2}
    words = ["generate", "--base", "toy", "--subject", SUBJECT, "--style", STYLE, "--prompt", prompt]
    assert main([*words, "--steps", "4", "--scheduler", "euler-a", "--seed", "2", "--out", str(tmp_path / "cli")]) == 0
    (cli_png,) = (tmp_path / "cli").glob("*.png")

    monkeypatch.setenv("ESTLORA_CACHE", str(tmp_path / "ui-cache"))
    studio = Studio(None, tmp_path / "ui")
    page = {**dataclasses.asdict(studio.defaults.fusion), **dataclasses.asdict(studio.defaults.sampling), **chosen}
    page |= {"subject_choice": SUBJECT, "subject_file": None, "style_choice": STYLE, "style_file": None}
    page |= {"prompt": prompt, "beta_mode": "auto", "beta": 0.5}
    capfd.readouterr()
    images, notes, *_ = studio.run(page, ["est"], 1, lambda *args, **kwargs: None)
    assert "it/s" not in capfd.readouterr().err  # no tqdm bar per render in the server's console
    ((ui_png, _),) = images

    cli_meta, ui_meta = (json.loads(Path(p).with_suffix(".json").read_text()) for p in (cli_png, ui_png))
    assert cli_meta["beta_source"] == ui_meta["beta_source"] == "measured"
    assert cli_meta["beta"] == ui_meta["beta"] and f"beta = {ui_meta['beta']:.4g}" in notes
    assert "1 - the toy scorer's cosine" in notes and "DINO" not in notes  # the toy base measures with its scorer
    assert cli_meta["scheduler"] == ui_meta["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert np.array_equal(np.asarray(Image.open(cli_png)), np.asarray(Image.open(ui_png)))
    assert cli_meta["command"] == ui_meta["command"]
    values, note = studio.settings_from_png(cli_png, set(page))  # the CLI's image, its settings back in the page
    assert (values["steps"], values["scheduler"], values["seed"], values["prompt"]) == (4, "euler-a", 2, prompt)
    assert (values["beta_mode"], values["beta"]) == ("manual", cli_meta["beta"])  # the image's own beta
    assert (values["subject_choice"], values["style_choice"]) == (SUBJECT, STYLE)
    assert note == f"Loaded the settings of {cli_png.name}."


def block_label(page: Page, component: str):
    return page.locator(f"{component} [data-testid=block-label]").first


def test_a_failed_run_marks_the_panels_stale(page):
    """After a failed Generate the panels still show the run before, and say so; the next good run
    clears the marks."""
    page.locator("#generate").click()
    expect(page.locator("#gallery img")).to_have_count(1)
    for panel in ("#gallery", "#heatmaps", "#files"):
        expect(block_label(page, panel)).not_to_contain_text("stale")
    set_number(page, "#steps", "0")
    page.locator("#generate").click()
    expect_error(page, "steps: must be at least 1, not 0")
    expect(page.locator("#result")).to_contain_text("Not rendered: steps: must be at least 1, not 0.")
    for panel in ("#gallery", "#heatmaps", "#plan-summary", "#files"):
        expect(block_label(page, panel)).to_contain_text("stale: from the run before")
    expect(page.locator("#gallery img")).to_have_count(1)  # the run before, still there, marked
    shot(page, "stale")
    set_number(page, "#steps", STEPS)
    page.locator("#generate").click()
    expect(page.locator("#result")).to_contain_text("beta = ")
    for panel in ("#gallery", "#heatmaps", "#plan-summary", "#files"):
        expect(block_label(page, panel)).not_to_contain_text("stale")


def test_settings_survive_a_reload(page):
    """What was typed and picked comes back after a reload (the browser keeps it), as in ComfyUI."""
    set_number(page, "#steps", "7")
    set_number(page, "#seed", "42")
    page.locator("#prompt textarea").fill("kept across a reload")
    page.locator("#method label", has_text="klora").click()
    page.locator("#style-choice input").click()
    page.locator("li[role=option]", has_text=OTHER_STYLE).click()
    expect(page.locator("#lora-info")).to_contain_text(OTHER_STYLE)
    page.wait_for_timeout(500)  # the last change reaches the browser's storage
    page.reload()
    page.locator("#generate").wait_for()
    expect(page.locator("#steps input[type=number]")).to_have_value("7")
    expect(page.locator("#seed input[type=number]")).to_have_value("42")
    expect(page.locator("#prompt textarea")).to_have_value("kept across a reload")
    expect(page.locator("#method input[value=klora]")).to_be_checked()
    expect(page.locator("#style-choice input")).to_have_value(OTHER_STYLE)


def test_each_fusion_option_is_explained(page):
    """Beside each fusion option, its declaration's explanation (one source for the page and --help)."""
    from estlora.config import FusionConfig, settings_of

    helps = {item.name: item.help for item in settings_of(FusionConfig)}
    page.locator("button", has_text="Fusion options").click()
    for name in ("method", "alpha", "pattern", "gamma_rule", "route"):
        assert len(helps[name].split()) >= 12, name  # an explanation, not a label
        expect(page.locator(f"#{name.replace('_', '-')}")).to_contain_text(helps[name][:60])


def test_download_and_upload_names_are_unique_and_whole(page, tmp_path):
    """Two runs never offer two files of one name, and no file name is cut short on the page."""
    named = tmp_path / "my-dog-subject-lora-by-someone-trained-on-twenty-photos-v2-epoch-000010.safetensors"
    shutil.copy(toy_lora_path("heart"), named)
    upload(page, "subject", named)
    expect(page.locator("#lora-info")).to_contain_text(named.name)
    names, links, first = [], page.locator("#files a"), None
    for _ in range(2):
        page.locator("#generate").click()
        if first:  # the second run's files replace the first's
            expect(links.first).not_to_have_attribute("href", first)
        expect(links).to_have_count(3)
        first = links.first.get_attribute("href")
        names.append({Path(link.get_attribute("href")).name for link in links.all()})
    assert len(names[0] | names[1]) == 6
    shot(page, "names")
    for stem in page.locator(".filename .stem").all():  # the uploads' and downloads' names
        assert stem.evaluate("e => e.scrollWidth <= e.clientWidth + 1"), stem.inner_text()
    expect(page.locator("#subject-file .filename")).to_contain_text(named.stem)


@pytest.mark.slow
def test_a_closed_tab_is_dropped(browser, ui_app):
    """A tab closed while its run renders stops that run at its next step (at the next heartbeat), and
    a closed tab's queued request never runs: the next user gets the pipeline at once."""
    url, out = ui_app

    def open_page() -> Page:
        tab = browser.new_page(viewport={"width": 1400, "height": 1100})
        tab.set_default_timeout(TIMEOUT_MS)
        tab.goto(url)
        tab.locator("#generate").wait_for()
        return tab

    long, queued, next_user = open_page(), open_page(), open_page()
    set_number(long, "#steps", "400")  # a minute or more on the toy model, unless stopped
    for side in ("#width", "#height"):
        set_number(long, side, "256")
    set_number(long, "#seed", "777")  # file names no other test writes
    long.locator("#method label", has_text="klora").click()
    long.locator("#generate").click()
    expect(long.locator("#gallery")).to_contain_text(re.compile(r"[1-9]\d*/400 steps"))
    set_number(queued, "#steps", STEPS)
    set_number(queued, "#seed", "778")
    queued.locator("#method label", has_text="style").click()
    queued.locator("#generate").click()
    expect(queued.locator("#gallery")).to_contain_text("queue")
    queued.close()
    long.close()
    set_number(next_user, "#steps", STEPS)
    next_user.locator("#method label", has_text="subject").click()
    next_user.locator("#generate").click()
    expect(next_user.locator("#gallery img")).to_have_attribute("alt", "subject · seed 0")
    next_user.close()
    assert not list(out.rglob("*-klora-seed777.png"))  # stopped: never finished
    assert not list(out.rglob("*-style-seed778.png"))  # dropped: never ran


@pytest.fixture(scope="module")
def second_app(tmp_path_factory):
    """An app of its own for the base switches, so the other tests keep the toy base."""
    from estlora import ui

    with pytest.MonkeyPatch.context() as env:
        env.setenv(ui.OUT_ENV, str(tmp_path_factory.mktemp("ui-flux-outputs")))
        app = ui.launch(None, "127.0.0.1", free_port(), block=False)
        yield app.local_url
        app.close()


def pick(page: Page, component: str, option: str) -> None:
    page.locator(f"{component} input").click()
    page.locator("li[role=option]", has_text=option).click()


def test_flux_in_the_page_with_its_own_settings(browser, second_app):
    """FLUX.1 from the base choice: its samplers, size multiple, guidance meaning and its settings
    alone are shown; it renders; a base that does not load leaves the loaded one; SDXL comes back."""
    from estlora.families.flux import Flux1

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(second_app)
    page.locator("#generate").wait_for()
    for shown, hidden in ((("#guidance-rescale",), ("#true-cfg", "#max-sequence-length")),):
        for element in shown:
            expect(page.locator(element)).to_be_visible()
        for element in hidden:
            expect(page.locator(element)).to_be_hidden()

    pick(page, "#base", "tiny-flux")
    expect(page.locator("#heading")).to_contain_text("the tiny FLUX.1")
    expect(page.locator("#lora-info")).to_contain_text("Both LoRAs fit the tiny FLUX.1")
    expect(page.locator("#subject-choice input")).to_have_value("example:flux-subject")
    for element in ("#true-cfg", "#max-sequence-length"):
        expect(page.locator(element)).to_be_visible()
    expect(page.locator("#guidance-rescale")).to_be_hidden()
    expect(page.locator("#guidance")).to_contain_text("embedded (distilled) guidance")
    expect(page.locator("#width input")).to_have_value("64")
    assert page.locator("#width input").get_attribute("step") == str(Flux1.size_multiple)
    page.locator("#scheduler input").click()
    samplers = [re.compile(rf"(^|\s){re.escape(name)}$") for name in Flux1().schedulers]
    expect(page.locator("li[role=option]")).to_have_text(samplers)
    page.keyboard.press("Escape")
    set_number(page, "#steps", STEPS)
    page.locator("#generate").click()
    image = page.locator("#gallery img")
    expect(image).to_have_attribute("alt", "est · seed 0")
    meta = png_settings(page, image.get_attribute("src"))
    assert meta["family"] == "flux1" and "--base tiny-flux" in meta["command"]
    shot(page, "flux")

    page.locator("#base input").fill("/no/such/base")
    page.locator("#base input").press("Enter")
    expect_error(page, "/no/such/base")
    expect(page.locator("#base input")).to_have_value("tiny-flux")
    expect(page.locator("#heading")).to_contain_text("the tiny FLUX.1")

    pick(page, "#base", "toy")
    expect(page.locator("#heading")).to_contain_text("the toy SDXL")
    expect(page.locator("#guidance-rescale")).to_be_visible()
    expect(page.locator("#true-cfg")).to_be_hidden()
    set_number(page, "#steps", STEPS)
    flux_image = image.get_attribute("src")
    page.locator("#generate").click()
    expect(image).not_to_have_attribute("src", flux_image)
    assert png_settings(page, image.get_attribute("src"))["family"] == "sdxl"
    page.close()
