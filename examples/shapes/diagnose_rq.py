"""Where a Shapes UniFork with the RQ tokenizer goes wrong: teacher-forced vs sampled codes, depth by depth.

    python examples/shapes/diagnose_rq.py runs/shapes/unifork-rq-d1 runs/shapes/unifork-rq-d4 [--n 40]

For the first `--n` test scenes: the teacher-forced accuracy and cross-entropy of each depth's code (the true
codes of the image fed in), how often `generate_image`'s codes (the checkpoint's sampling settings, one seeded
generator per image) equal the image's own codes, and the Shapes judge on decoded images: the true codes, the
sampled ones, and (depth > 1) the sampled depth-0 codes with the true deeper ones and the reverse; how many of the
images judged wrong already have a teacher-forced depth-0 miss (the fit) rather than none (decoding from the model's
own codes); then the sampled codes' judgement under greedy decoding, guidance 3 and temperature 1.
"""

import argparse
import functools

import torch

from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.shapes import shapes_dataset
from unifork_hf.evaluation import detect


def judged_right(processor, originals, codes) -> torch.Tensor:
    """Per image: whether the Shapes judge finds the same objects in the decoded codes as in the original."""
    images = processor.decode_image_tokens(codes)
    return torch.tensor([sorted(map(str, detect(a))) == sorted(map(str, detect(b))) for a, b in zip(images, originals)])


def share(flags: torch.Tensor) -> float:
    return flags.double().mean().item()  # float64: 385/400 prints as 0.963, as in the committed logs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--n", type=int, default=40)
    args = parser.parse_args()
    test = shapes_dataset(num_train=0, num_test=args.n, num_heldout=0, seed=0)["test"]
    for path in args.models:
        model = UniForkForConditionalGeneration.from_pretrained(path).eval()
        processor = model.processor
        true = processor.encode_images(list(test["image"]))
        depth = true.shape[-1]
        correct, entropy, places = torch.zeros(depth), torch.zeros(depth), 0
        first_code_miss = torch.zeros(args.n, dtype=torch.bool)  # an image with a teacher-forced depth-0 miss
        for i, caption in enumerate(test["caption"]):
            text = processor.image_generation_sequence(caption)
            ids = processor.tokenizer([text], return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(input_ids=ids, image_ids=true[i : i + 1], task="generation").image_logits
            logits = logits[0, (ids[0] == model.config.image_token_id).nonzero().squeeze(1) - 1]
            right = logits.argmax(-1) == true[i]
            correct += right.float().sum(0)
            first_code_miss[i] = not right[:, 0].all()
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), true[i].flatten(), reduction="none")
            entropy += losses.view(-1, depth).sum(0)
            places += logits.shape[0]
        generators = [torch.Generator().manual_seed(j) for j in range(args.n)]
        sampled = model.generate_image(
            list(test["caption"]), generator=generators, output_type="tokens", progress_bar=False
        )
        judged = functools.partial(judged_right, processor, test["image"])

        print(f"{path}: depth {depth}, {args.n} test scenes")
        print(f"  teacher-forced accuracy by depth {[round(v, 4) for v in (correct / places).tolist()]}")
        print(f"  teacher-forced cross-entropy by depth {[round(v, 4) for v in (entropy / places).tolist()]}")
        agreement = (sampled == true).float().mean((0, 1))
        print(f"  sampled code == the image's own, by depth {[round(v, 4) for v in agreement.tolist()]}")
        sampled_right = judged(sampled)
        print(f"  judged all-correct: true codes {share(judged(true)):.3f}, sampled codes {share(sampled_right):.3f}")
        # the fit or the free-running? If the images whose sampling fails are those with a teacher-forced miss,
        # the fit explains the loss; failures without one come from decoding from the model's own codes
        failed = ~sampled_right
        print(
            f"  images with a teacher-forced depth-0 miss: {int(first_code_miss.sum())}; sampled images judged "
            f"wrong: {int(failed.sum())}, of them with such a miss: {int((failed & first_code_miss).sum())}"
        )
        if depth > 1:
            first = true.clone()
            first[..., 0] = sampled[..., 0]
            rest = sampled.clone()
            rest[..., 0] = true[..., 0]
            print(f"  judged all-correct: sampled depth 0 + true deeper codes {share(judged(first)):.3f}, "
                  f"true depth 0 + sampled deeper codes {share(judged(rest)):.3f}")  # fmt: skip
        for settings in ({"top_k": 1}, {"guidance_scale": 3.0}, {"temperature": 1.0}):  # other sampling settings
            generators = [torch.Generator().manual_seed(j) for j in range(args.n)]
            codes = model.generate_image(
                list(test["caption"]), generator=generators, output_type="tokens", progress_bar=False, **settings
            )
            print(f"  with {settings}: judged all-correct {share(judged(codes)):.3f}")


if __name__ == "__main__":
    main()
