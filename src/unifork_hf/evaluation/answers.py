"""Answers as text: a batch of (image, question) pairs in, the decoded replies out.

The idiom underneath, for one pair:

```python
>>> import unifork_hf
>>> from PIL import Image
>>> from unifork_hf import UniForkForConditionalGeneration
>>> model = UniForkForConditionalGeneration.from_pretrained(unifork_hf.DEMO_CHECKPOINT)
>>> processor = model.processor
>>> content = [{"type": "text", "text": "What colour is the circle?"}, {"type": "image"}]
>>> text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
>>> inputs = processor(images=[Image.new("RGB", (32, 32), "white")], text=[text], return_tensors="pt")
>>> output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
>>> answer = processor.batch_decode(output[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)[0]  # drop the prompt
>>> isinstance(answer, str)
True

```
"""

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def answer_questions(
    model, images, questions, batch_size=100, max_new_tokens=4, progress_bar=True, question_first: bool = True
):
    """Greedy answers (one image + one question per row), batched with left padding. The user turn says
    the question, then shows the image (as `to_understanding` trains); `question_first=False` asks a
    model trained with the image first."""
    processor = model.require_processor()
    answers = []
    for start in tqdm(range(0, len(questions), batch_size), desc="answers", disable=not progress_bar):
        texts = []
        for question in questions[start : start + batch_size]:
            content = [{"type": "image"}, {"type": "text", "text": question}]
            content = content[::-1] if question_first else content
            texts.append(
                processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            )
        inputs = processor(
            images=list(images[start : start + batch_size]), text=texts, padding=True, return_tensors="pt"
        ).to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(output[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


__all__ = ["answer_questions"]
