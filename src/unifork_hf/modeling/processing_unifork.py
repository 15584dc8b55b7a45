"""Processor of UniFork: text tokenizer + image processor (+ the model's image tokenizer when attached)."""

import numpy as np
import PIL.Image
import torch
from transformers import ProcessorMixin

from .image_processing_unifork import check_image_types
from .vq_unifork import hub_kwargs, image_tokenizer_from_checkpoint

# An image in a sequence: BOI_TOKEN, image_seq_length x IMAGE_TOKEN (each replaced by one VQ code's embedding), EOI_TOKEN.
IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = "<image>", "<begin_of_image>", "<end_of_image>"

# Each image placeholder expands to <begin_of_image> + num_image_tokens x <image> + <end_of_image>.
# {% generation %} marks the assistant's replies (+ eos): the tokens trained by understanding SFT.
DEFAULT_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}<image>{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>{{ '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{ render(message['content']) }}{{ eos_token or '' }}{%- endgeneration -%}"
    "{%- else -%}{{ render(message['content']) }}{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- endif -%}"
)


class UniForkProcessor(ProcessorMixin):
    """Prepares UniFork inputs: chat text with images for understanding, prompts for image generation.

    Args:
        image_processor: a [`UniForkImageProcessorPil`] (resize, RGB conversion, scale to [-1, 1]).
        tokenizer: the LLM's tokenizer, holding the `<image>`, `<begin_of_image>` and `<end_of_image>` tokens.
        chat_template: Jinja chat template; an `{"type": "image"}` item renders as one `<image>` placeholder.
        image_seq_length: tokens per image (the VQ code grid, e.g. 16x16 = 256).

    `image_tokenizer` (a [`UniForkVQImageTokenizer`] or [`UniForkRQImageTokenizer`]) is needed only by
    `encode_images` / `decode_image_tokens`. `from_pretrained` reads it out of the checkpoint's model weights
    (where the one copy of it lives); a model loaded with `from_pretrained` shares its own with `model.processor`.

    Example:

    ```python
    >>> import unifork_hf
    >>> from unifork_hf import UniForkForConditionalGeneration
    >>> from unifork_hf.data.shapes import render
    >>> model = UniForkForConditionalGeneration.from_pretrained(unifork_hf.DEMO_CHECKPOINT)
    >>> processor = model.processor
    >>> image = render([{"colour": "red", "shape": "circle", "size": "large", "position": "top left"}])
    >>> # the demo was trained with each question before its image (to_understanding): ask it so
    >>> question = [{"type": "text", "text": "What colour is the shape at the top left?"}, {"type": "image"}]
    >>> text = processor.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    >>> inputs = processor(images=image, text=text, return_tensors="pt")  # <image> becomes 64 image tokens
    >>> output = model.generate(**inputs, max_new_tokens=4)  # the prompt, then the answer
    >>> processor.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    'red'

    ```
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_seq_length: int = 64,
        image_token: str = IMAGE_TOKEN,
        boi_token: str = BOI_TOKEN,
        eoi_token: str = EOI_TOKEN,
        **kwargs,
    ):
        self.image_seq_length = image_seq_length
        self.image_token = image_token
        self.boi_token = boi_token
        self.eoi_token = eoi_token
        self.image_tokenizer = None
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)
        # Batched generation continues every row from its last token, so pad on the left.
        tokenizer.padding_side = "left"
        missing = [t for t in (image_token, boi_token, eoi_token) if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"The tokenizer lacks the special tokens {missing}; add them with "
                "`tokenizer.add_tokens([...], special_tokens=True)` (UniForkForConditionalGeneration.from_pretrained_llm "
                "does this) and resize the model's embeddings."
            )
        self.image_token_id, self.boi_token_id, self.eoi_token_id = tokenizer.convert_tokens_to_ids(
            [image_token, boi_token, eoi_token]
        )
        self._check_template_spelling()

    def _check_template_spelling(self):
        """Raise if the chat template's own text (role markers, newlines) tokenizes to the unknown token: the
        prompts would silently lose their structure."""
        unk = self.tokenizer.unk_token_id
        if unk is None or not self.chat_template:
            return
        turns = [{"role": role, "content": []} for role in ("user", "assistant")]
        text = self.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        unknown = [
            text[a:b]
            for token, (a, b) in zip(encoded.input_ids, encoded.offset_mapping)
            if token == unk and text[a:b] != self.tokenizer.unk_token
        ]  # (GPT-2's unk is its eos)
        if unknown:
            raise ValueError(
                f"The tokenizer turns the chat template's {sorted(set(unknown))} into {self.tokenizer.unk_token!r}: "
                "add those strings to its vocabulary (e.g. `tokenizer.add_tokens([...], special_tokens=True)`) "
                "or pass a `chat_template` it can spell."
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, image_tokenizer=None, **kwargs):
        """Load the processor; the image tokenizer comes from the checkpoint's weights unless given."""
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if image_tokenizer is None:
            image_tokenizer = image_tokenizer_from_checkpoint(pretrained_model_name_or_path, **hub_kwargs(kwargs))
        processor.image_tokenizer = image_tokenizer
        return processor

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if images is not None:
            check_image_types(images)
        return super().prepare_inputs_layout(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_sequence()

    def image_sequence(self) -> str:
        """One image as the model reads it: `<begin_of_image>`, `image_seq_length` x `<image>` (each position
        then holds one VQ code's embedding), `<end_of_image>`."""
        return self.boi_token + self.image_token * self.image_seq_length + self.eoi_token

    # ------------------------------------------------------------------ image generation prompts

    def image_generation_prompt(self, prompt: str) -> str:
        """The text the model continues with image tokens: a user turn holding `prompt`, then
        the assistant turn opened with `<begin_of_image>`. An empty prompt is the unconditional one."""
        conversation = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        # `image_generation=True` lets a template write image requests its own way (the official UniFork one does);
        # only a template that reads it gets it, as transformers warns about every extra kwarg a template ignores
        templates = self.chat_template.values() if isinstance(self.chat_template, dict) else [self.chat_template or ""]
        flags = {"image_generation": True} if any("image_generation" in t for t in templates) else {}
        text = self.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False, **flags)
        return text + self.boi_token

    def image_generation_sequence(self, prompt: str) -> str:
        """A whole generation sample as text: the prompt (ending in `<begin_of_image>`), the image's
        placeholders and `<end_of_image>`; training puts the image's codes at the placeholders."""
        return self.image_generation_prompt(prompt) + self.image_sequence().removeprefix(self.boi_token)

    def image_generation_inputs(self, prompts: list[str], return_tensors: str = "pt"):
        """Tokenized, left-padded image-generation prompts (`input_ids`, `attention_mask`)."""
        texts = [self.image_generation_prompt(p) for p in prompts]
        return self.tokenizer(
            texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors=return_tensors
        )

    # ------------------------------------------------------------------ images <-> image tokens

    def to_pil(self, images: torch.Tensor) -> list[PIL.Image.Image]:
        """`(B, 3, H, W)` images in [0, 1] -> list of RGB PIL images."""
        array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [PIL.Image.fromarray(np.ascontiguousarray(a)) for a in array]

    def require_image_tokenizer(self):
        """The image tokenizer, or a ValueError saying how to attach one."""
        if self.image_tokenizer is None:
            raise ValueError(
                "This needs the image tokenizer: load the processor through the model "
                "(`model.processor`) or set `processor.image_tokenizer = model.model.image_tokenizer`."
            )
        return self.image_tokenizer

    def encode_images(self, images) -> torch.Tensor:
        """Images -> code ids `(B, num_image_tokens)` (VQ) or `(B, num_image_tokens, depth)` (RQ)."""
        tokenizer = self.require_image_tokenizer()
        pixel_values = self.image_processor(images, return_tensors="pt").pixel_values
        return tokenizer.encode(pixel_values.to(tokenizer.codebook.device))

    def post_process_multimodal_output(
        self, generated_outputs, skip_special_tokens=True, generation_mode=None, **kwargs
    ):
        """Text ids -> strings; with `generation_mode="image"`, images `(B, 3, H, W)` in [0, 1] (as
        `model.decode_image_tokens` makes them) -> PIL images. The any-to-any pipeline's last step."""
        if generation_mode == "image":
            return self.to_pil(torch.as_tensor(generated_outputs).float())
        return super().post_process_multimodal_output(
            generated_outputs, skip_special_tokens=skip_special_tokens, generation_mode=generation_mode, **kwargs
        )

    def decode_image_tokens(self, image_ids: torch.Tensor, output_type: str = "pil"):
        """Code ids `(B, num_image_tokens)` (VQ) or `(B, num_image_tokens, depth)` (RQ) -> a list of PIL images, or with `output_type="pt"` a
        `(B, 3, H, W)` tensor in [0, 1]."""
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}.")
        # (a VQ's decoder output is clamped to [-1, 1]; the RQ tokenizer's, as the official one, is not)
        images = ((self.require_image_tokenizer().decode(torch.as_tensor(image_ids)).float() + 1) / 2).clamp(0, 1)
        return images if output_type == "pt" else self.to_pil(images)


__all__ = ["UniForkProcessor"]
