"""A web demo of one checkpoint: text -> images in one tab, (image, question) -> answer in the other.

```
unifork serve --model DIR          # http://127.0.0.1:7860 (default: the bundled Shapes checkpoint)
```

or from Python:

```python
from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.web_demo import build_demo

demo = build_demo(UniForkForConditionalGeneration.from_pretrained("DIR"))
demo.launch()
```

The two handlers are plain functions of the model (`draw`, `answer`), so what the page shows is what
`generate_image` and `answer_questions` return for the same settings and seeds. Needs gradio (the `serve`
extra: `pip install "unifork-hf[serve]"`).
"""

import gradio as gr
import torch

from unifork_hf.evaluation.answers import answer_questions

MAX_IMAGES = 16
TRACK_TQDM = gr.Progress(track_tqdm=True)  # a handler's default argument: gradio shows generate_image's tqdm bar
# Images of a few dozen pixels are shown enlarged with sharp pixels (the files served stay the model's own).
PIXELATED = """<style>
#gallery img, #image img, .gallery img { image-rendering: pixelated; }
#image img { width: 100%; height: 100%; object-fit: contain; }
</style>"""


def prompt_lines(text: str | None) -> list[str]:
    """The prompts of the text box: one per non-blank line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def draw(model, prompts: str, num_images: int, guidance_scale: float, temperature: float, seed: int):
    """`num_images` samples of each prompt (one per line), prompt by prompt; image i of the whole batch is drawn
    with `torch.Generator().manual_seed(seed + i)` (as `unifork generate-image` does), so a seed shown on the
    page reproduces its images anywhere."""
    prompts = prompt_lines(prompts)
    if not prompts:
        raise gr.Error("Type a prompt first (one per line), e.g. the kind of caption the model was trained on.")
    num_images, seed = int(num_images), int(seed)
    if not 1 <= num_images <= MAX_IMAGES:
        raise gr.Error(f"Images per prompt must be between 1 and {MAX_IMAGES}, got {num_images}.")
    try:
        return model.generate_image(
            prompts,
            num_images_per_prompt=num_images,
            guidance_scale=guidance_scale,
            temperature=temperature,
            generator=[torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * num_images)],
        )
    except ValueError as error:  # a sampling setting out of range: say which, on the page
        raise gr.Error(str(error)) from error


def answer(model, image, question: str, question_first: bool = True) -> str:
    """The greedy answer to `question` about `image` (a PIL image), as `answer_questions` gives it."""
    question = (question or "").strip()
    if image is None:
        raise gr.Error("Upload an image first.")
    if not question:
        raise gr.Error("Type a question about the image.")
    return answer_questions(
        model, [image.convert("RGB")], [question], max_new_tokens=32, progress_bar=False, question_first=question_first
    )[0]


def build_demo(
    model, title: str = "UniFork", question_first: bool = True, prompt_examples=(), question_examples=()
) -> gr.Blocks:
    """The page: a "Generate images" tab and an "Ask about an image" tab, both served by `model`.

    Args:
        question_first: `False` asks a model trained with the image before the question.
        prompt_examples: prompts shown under the prompt box, one click to use (e.g. captions like the training data's).
        question_examples: `(PIL image, question)` pairs shown under the question box.
    """
    model.require_processor()
    settings = model.image_generation_settings()
    size = model.config.image_size
    with gr.Blocks(title=title) as demo:
        gr.HTML(PIXELATED, padding=False)
        gr.Markdown(
            f"# {title}\n{model.num_parameters() / 1e6:.1f}M parameters, "
            f"{model.config.num_shared_layers} shared + 2 x {model.config.num_branch_layers} branch layers, "
            f"{size}x{size} px images."
        )
        with gr.Tab("Generate images"):
            prompt = gr.Textbox(label="Prompts, one per line", lines=2, max_lines=8, elem_id="prompt")
            if prompt_examples:
                gr.Examples([[p] for p in prompt_examples], [prompt])
            with gr.Row():
                num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images per prompt")
                guidance = gr.Slider(1.0, 15.0, value=settings["guidance_scale"], step=0.5, label="Guidance (CFG)")
                temperature = gr.Slider(0.05, 2.0, value=settings["temperature"], step=0.05, label="Temperature")
                seed = gr.Number(value=0, precision=0, label="Seed")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            gallery = gr.Gallery(label="Images", columns=4, format="png", elem_id="gallery")  # png: exact pixels

            def show(prompts, num_images, guidance, temperature, seed, progress=TRACK_TQDM):
                images = draw(model, prompts, num_images, guidance, temperature, seed)  # its tqdm bar: the progress
                captions = prompt_lines(prompts)
                return [(image, captions[i // int(num_images)]) for i, image in enumerate(images)]

            generate.click(show, [prompt, num_images, guidance, temperature, seed], gallery)
        with gr.Tab("Ask about an image"):
            with gr.Row():
                image = gr.Image(type="pil", label="Image", height=256, elem_id="image")
                with gr.Column():
                    question = gr.Textbox(label="Question", elem_id="question")
                    if question_examples:
                        gr.Examples([list(pair) for pair in question_examples], [image, question])
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    reply = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
            gr.on(
                [ask.click, question.submit],
                lambda img, q: answer(model, img, q, question_first),
                [image, question],
                reply,
            )
    return demo


def shapes_examples(num_prompts: int = 4, num_questions: int = 3):
    """Prompts and (image, question) pairs from the Shapes test split, for the bundled Shapes checkpoint."""
    from unifork_hf.data.shapes import shapes_dataset

    test = shapes_dataset(num_train=0, num_test=num_prompts + num_questions, num_heldout=0, seed=0)["test"]
    prompts = test["caption"][:num_prompts]
    rows = (test[i] for i in range(num_prompts, len(test)))
    pairs = [(row["image"], row["questions"][0]["question"]) for row in rows]
    return prompts, pairs


__all__ = ["build_demo", "draw", "answer", "shapes_examples"]
