"""Train the Shapes text tokenizer: a word-level `tokenizers` model over the captions, questions and answers.

    python examples/shapes/train_tokenizer.py --out runs/shapes/tokenizer [--seed 0]

Saved as a `PreTrainedTokenizerFast` with the chat-template markers and UniFork's image tokens as
special tokens; every word of the benchmark is one token (about 60 in all).
"""

import argparse

from unifork_hf.data.shapes import shapes_dataset
from unifork_hf.training import build_text_tokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = shapes_dataset(num_train=20000, num_test=500, num_heldout=500, seed=args.seed)["train"]
    texts = list(data["caption"]) + [qa[k] for qas in data["questions"] for qa in qas for k in ("question", "answer")]
    tokenizer = build_text_tokenizer(texts)  # word-level: every word of the benchmark is one token
    tokenizer.save_pretrained(args.out)
    print(f"vocabulary of {len(tokenizer)} tokens -> {args.out}")
    print("example:", tokenizer.tokenize("<|user|>\n<image>What colour is the shape at the top left?\n<|assistant|>\n"))


if __name__ == "__main__":
    main()
