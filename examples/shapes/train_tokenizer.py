"""Train the Shapes text tokenizer: a word-level `tokenizers` model over the captions, questions and answers.

    python examples/shapes/train_tokenizer.py --out runs/shapes/tokenizer [--seed 0]

Saved as a `PreTrainedTokenizerFast` with the chat-template markers and UniFork's image tokens as
special tokens; every word of the benchmark is one token (about 60 in all).
"""

import argparse

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from unifork_hf.data.shapes import shapes_dataset

SPECIAL = [
    "<|pad|>",
    "<|endoftext|>",
    "<unk>",
    "<|user|>",
    "<|assistant|>",
    "<image>",
    "<begin_of_image>",
    "<end_of_image>",
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = shapes_dataset(num_train=20000, num_test=500, num_heldout=500, seed=args.seed)["train"]
    texts = list(data["caption"]) + [qa[k] for qas in data["questions"] for qa in qas for k in ("question", "answer")]

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL, show_progress=False))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL[3:],
    )
    fast.save_pretrained(args.out)
    print(f"vocabulary of {len(fast)} tokens -> {args.out}")
    print("example:", fast.tokenize("<|user|>\n<image>What colour is the shape at the top left?\n<|assistant|>\n"))


if __name__ == "__main__":
    main()
