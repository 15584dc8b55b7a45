"""A text tokenizer for a UniFork: build one from your texts, or adopt an existing one.

Either way the tokenizer ends up with what the processor's chat template and the image layout need as
single tokens: the role markers `<|user|>` / `<|assistant|>`, `<image>`, `<begin_of_image>`,
`<end_of_image>`, an end-of-text and a pad token.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..modeling.forking_unifork import IMAGE_TOKENS
from ..modeling.image_processing_unifork import UniForkImageProcessorPil
from ..modeling.processing_unifork import UniForkProcessor

CHAT_MARKERS = ("<|user|>", "<|assistant|>")  # the roles DEFAULT_CHAT_TEMPLATE writes as `<|role|>`
PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<unk>"


def build_text_tokenizer(texts, vocab_size: int | None = None, lowercase: bool = False) -> PreTrainedTokenizerFast:
    """A tokenizer trained on `texts` (captions, questions, answers), with UniFork's special tokens.

    `vocab_size=None` (default) makes a word-level vocabulary: every distinct word and punctuation mark of
    `texts` is one token, and anything else is `<unk>` (right for a closed domain such as a benchmark's
    questions). An int trains a byte-level BPE of about that many tokens instead, which spells any text.

    Example:

    ```python
    >>> from unifork_hf.training import build_text_tokenizer
    >>> tokenizer = build_text_tokenizer(["a red circle", "What colour is the circle?", "red"])
    >>> tokenizer.tokenize("<|user|>\\n<image>What colour is the circle?")
    ['<|user|>', '<image>', 'What', 'colour', 'is', 'the', 'circle', '?']

    ```
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(text, str) for text in texts):
        raise ValueError("texts must be a non-empty list of strings.")
    special = [PAD, EOS, UNK, *CHAT_MARKERS, *IMAGE_TOKENS]
    if vocab_size is None:
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
        tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        trainer = trainers.WordLevelTrainer(special_tokens=special, show_progress=False)
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    if lowercase:
        from tokenizers import normalizers

        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(CHAT_MARKERS + IMAGE_TOKENS),
    )
    return prepare_text_tokenizer(fast)


def prepare_text_tokenizer(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None):
    """Make an existing tokenizer (e.g. an LLM's) ready for UniFork, in place; returns it.

    Adds the image tokens and the role markers of the chat template as special tokens (where the tokenizer
    does not have them), and a pad token (its end-of-text, else `<|pad|>`) if it has none; then checks that
    the template renders without unknown tokens, raising a `ValueError` that names what it cannot spell.
    Grow the LLM's embeddings afterwards if `len(tokenizer)` exceeds them (`from_pretrained_llm` does).
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}.")
    if tokenizer.eos_token is None:
        raise ValueError("The tokenizer has no eos_token: set one (`tokenizer.eos_token = ...`); answers end with it.")
    markers = CHAT_MARKERS if chat_template is None else ()  # a custom template brings its own markers
    missing = [token for token in (*markers, *IMAGE_TOKENS) if token not in tokenizer.get_vocab()]
    tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # the processor's own check: the template's text must not turn into <unk>
    UniForkProcessor(UniForkImageProcessorPil(), tokenizer, chat_template=chat_template)
    return tokenizer


__all__ = ["build_text_tokenizer", "prepare_text_tokenizer"]
