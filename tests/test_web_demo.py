"""The web demo (`unifork serve`): its handlers give what the library gives, and a real browser can use it.

The browser test drives headless Chromium (Debian's chromium + chromium-driver, which `.ci/run` installs) through
selenium. Without them it is skipped, unless UNIFORK_REQUIRE_BROWSER=1 (set by `.ci/run`) makes that a failure.
UNIFORK_SCREENSHOT_DIR=docs/images writes the README's screenshots.
"""

import importlib.util
import io
import os
import shutil
import socket
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")

import unifork_hf  # noqa: E402
from unifork_hf import UniForkForConditionalGeneration  # noqa: E402
from unifork_hf.evaluation.answers import answer_questions  # noqa: E402
from unifork_hf.web_demo import answer, build_demo, draw, shapes_examples  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def demo_model():
    return UniForkForConditionalGeneration.from_pretrained(unifork_hf.DEMO_CHECKPOINT).eval()


def pixels(images):
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


def test_draw_gives_generate_image_with_one_seed_per_image(demo_model):
    captions = shapes_examples(num_prompts=2, num_questions=0)[0]
    shown = draw(demo_model, f"  {captions[0]} \n\n{captions[1]}\n", 3, 1.0, 2.0, 7)  # one prompt per line
    expected = demo_model.generate_image(
        captions,
        num_images_per_prompt=3,
        guidance_scale=1.0,
        temperature=2.0,
        generator=[torch.Generator().manual_seed(7 + i) for i in range(6)],
        progress_bar=False,
    )
    np.testing.assert_array_equal(pixels(shown), pixels(expected))
    # the page's seed is the first image's: image i of seed s is image 0 of seed s + i
    np.testing.assert_array_equal(pixels(draw(demo_model, captions[0], 1, 1.0, 2.0, 8)), pixels(shown[1:2]))
    assert len({image.tobytes() for image in shown[:3]}) > 1, "temperature 2 should give different images per seed"


def test_answer_gives_answer_questions(demo_model):
    _, pairs = shapes_examples(num_prompts=0, num_questions=3)
    for image, question in pairs:
        expected = answer_questions(demo_model, [image], [question], max_new_tokens=32, progress_bar=False)[0]
        assert answer(demo_model, image.convert("RGBA"), f" {question} ") == expected  # RGBA (an upload) -> RGB


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: draw(m, "  \n ", 1, 1.0, 1.0, 0), "Type a prompt"),
        (lambda m: draw(m, "a circle", 0, 1.0, 1.0, 0), "between 1 and 16, got 0"),
        (lambda m: draw(m, "a circle", 1, 0.5, 1.0, 0), "guidance_scale"),
        (lambda m: draw(m, "a circle", 1, 1.0, 0.0, 0), "temperature"),
        (lambda m: answer(m, None, "What shape is it?"), "Upload an image"),
        (lambda m: answer(m, Image.new("RGB", (32, 32), "white"), " "), "Type a question"),
    ],
)
def test_bad_input_is_said_on_the_page(demo_model, call, message):
    with pytest.raises(gr.Error, match=message):
        call(demo_model)


def _browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    missing += [] if importlib.util.find_spec("selenium") else ["selenium"]
    if missing:
        if os.environ.get("UNIFORK_REQUIRE_BROWSER") == "1":
            pytest.fail(
                f"UNIFORK_REQUIRE_BROWSER=1 but {missing} are missing (apt-get install chromium chromium-driver)"
            )
        pytest.skip(f"no headless browser here: {missing} missing")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # without the networking flags Chromium keeps calling Google's hosts, which an offline machine refuses
    for flag in (
        "--headless=new --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
        "--disable-component-update --disable-sync --window-size=1200,1000"
    ).split():
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loaded_images(driver, css):
    from selenium.webdriver.common.by import By

    images = driver.find_elements(By.CSS_SELECTOR, css)
    loaded = [
        i for i in images if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
    ]
    return loaded if loaded and len(loaded) == len(images) else False


def _screenshot(driver, name):
    folder = os.environ.get("UNIFORK_SCREENSHOT_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)
        driver.save_screenshot(os.path.join(folder, name))


def test_browser_generates_images_and_answers_a_question(demo_model, tmp_path):
    """What a user does: type a caption, press Generate, see the images; upload a picture, ask, read the answer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    prompts, pairs = shapes_examples(num_prompts=4, num_questions=2)
    demo = build_demo(demo_model, title="UniFork Shapes demo", prompt_examples=prompts, question_examples=pairs)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(url)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        box.send_keys(f"{prompts[0]}\n{prompts[1]}")  # two prompts, one per line
        driver.find_element(By.ID, "generate").click()
        shown = wait.until(lambda d: _loaded_images(d, "#gallery img"))
        assert len(shown) == 8  # 4 per prompt: the slider's default
        # the page shows the model's images, seeds 0..7 at the checkpoint's settings, each under its prompt
        settings = demo_model.image_generation_settings()
        expected = draw(demo_model, "\n".join(prompts[:2]), 4, settings["guidance_scale"], settings["temperature"], 0)
        assert [i.get_attribute("alt") for i in shown] == [prompts[0]] * 4 + [prompts[1]] * 4  # each under its prompt
        served = [Image.open(io.BytesIO(urllib.request.urlopen(i.get_attribute("src")).read())) for i in shown]
        np.testing.assert_array_equal(pixels(served), pixels(expected))
        _screenshot(driver, "web-demo-generate.png")

        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Ask about an image')]").click()
        image, question = pairs[0]
        path = tmp_path / "question.png"
        image.save(path)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#image input[type=file]")).send_keys(str(path))
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
        wait.until(lambda d: _loaded_images(d, "#image img"))
        driver.find_element(By.ID, "ask").click()
        reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value"))
        assert reply == answer_questions(demo_model, [image], [question], max_new_tokens=32, progress_bar=False)[0]
        _screenshot(driver, "web-demo-answer.png")
    finally:
        driver.quit()
        demo.close()


def test_unifork_serve_launches_the_bundled_checkpoint_with_examples(monkeypatch):
    from unifork_hf.cli import main

    launched = {}

    def fake_launch(self, **kwargs):
        launched.update(
            kwargs, title=self.title, examples=[b for b in self.blocks.values() if isinstance(b, gr.Dataset)]
        )

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    main(["serve", "--port", "7999", "--host", "0.0.0.0"])
    assert (launched["server_name"], launched["server_port"], launched["share"]) == ("0.0.0.0", 7999, False)
    assert launched["title"] == "UniFork Shapes demo"
    assert [len(dataset.samples) for dataset in launched["examples"]] == [4, 3]  # captions; (image, question) pairs
