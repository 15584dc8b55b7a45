"""Why a Shapes checkpoint answers a question type wrong: does it look at the asked cell, and can it read it?

    python examples/shapes/diagnose_understanding.py [--model DIR] [-n 300] [--type colour] [--question-first]

For the questions of one type about `n` test scenes ("What colour is the shape at the top left?"):

1. Attention: per layer on the understanding path, the share of the answer position's attention
   (averaged over heads) that falls on the image tokens of the asked object (the codes its bounding box
   touches), on the other image tokens, and on the text. A model that has learned where to look puts
   much of it on the asked object.
2. Linear probes, fitted on half the questions and scored on the other half: is the answer linearly
   readable (a) from the answer position's hidden state after each layer, and (b) from the VQ code ids
   under the asked object (what the image tokens carry)? (b) high and (a) low means the model has not
   learned to fetch what is there.
3. For position questions ("Where is the red circle?"): on the two-shape scenes, how often the answer is
   right when the objects differ in colour, shape, both or neither, and how often the answer stays the
   same when the question names the *other* object instead. A model that looks the named object up
   answers differently; one that ignores the names answers the same.
"""

import argparse

import torch

import unifork_hf
from unifork_hf import UniForkForConditionalGeneration
from unifork_hf.data.shapes import IMAGE_SIZE, bounding_box, shapes_dataset, to_understanding
from unifork_hf.evaluation.answers import answer_questions


def fit_probe(features: torch.Tensor, labels: list[str], steps: int = 300) -> float:
    """Held-out accuracy of a softmax-regression probe (first half train, second half test)."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    x = (features - features.mean(0)) / (features.std(0) + 1e-6)
    half = len(y) // 2
    probe = torch.nn.Linear(x.shape[1], len(classes))
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(x[:half]), y[:half]).backward()
        optimizer.step()
    with torch.no_grad():
        return float((probe(x[half:]).argmax(-1) == y[half:]).float().mean())


def named_object_lookup(model, scenes, question_first=False):
    """Part 3: position questions about two-shape scenes, asked about the named object and about the other."""
    rows = [
        (scene, qa)
        for scene in scenes
        if len(scene["objects"]) == 2
        for qa in scene["questions"]
        if qa["type"] == "position"
    ]
    asked, others, kinds = [], [], []
    for scene, qa in rows:
        target, other = sorted(scene["objects"], key=lambda o: o["position"] != qa["answer"])
        asked.append(qa["question"])
        others.append(f"Where is the {other['colour']} {other['shape']}?")
        kinds.append(
            ("same colour" if target["colour"] == other["colour"] else "other colour")
            + ", "
            + ("same shape" if target["shape"] == other["shape"] else "other shape")
        )
    images = [scene["image"] for scene, _ in rows]
    replies = answer_questions(model, images, asked, progress_bar=False, question_first=question_first)
    swapped = answer_questions(model, images, others, progress_bar=False, question_first=question_first)
    print(f"position questions about the {len(rows)} two-shape scenes: right when the objects have")
    for kind in sorted(set(kinds)):
        right = [reply == qa["answer"] for reply, (_, qa), k in zip(replies, rows, kinds) if k == kind]
        print(f"  {kind}: {sum(right)}/{len(right)}")
    unchanged = sum(a == b for a, b in zip(replies, swapped)) / len(rows)
    print(f"same answer when the question names the other object: {unchanged:.3f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=unifork_hf.DEMO_CHECKPOINT)
    parser.add_argument("-n", type=int, default=300, help="test scenes")
    parser.add_argument("--type", default="colour", choices=["colour", "shape", "size", "position", "count"])
    parser.add_argument(
        "--question-first",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask each question before its image (--no-question-first: a model trained image first)",
    )
    args = parser.parse_args()
    model = UniForkForConditionalGeneration.from_pretrained(args.model, attn_implementation="eager").eval()
    processor = model.processor
    scenes = shapes_dataset(num_train=0, num_test=args.n, num_heldout=0, seed=0)["test"]
    rows = to_understanding(scenes)
    picked = [i for i, kind in enumerate(rows["type"]) if kind == args.type]

    grid = model.config.image_grid_size
    pixels_per_code = IMAGE_SIZE // grid
    captured = []
    layers = [*model.model.shared_layers, *model.model.understanding_layers]
    hooks = [layer.self_attn.register_forward_hook(lambda _m, _i, out: captured.append(out[1])) for layer in layers]
    attention = torch.zeros(len(layers), 3)  # asked object, other image tokens, text
    states, code_features, answers = [], [], []
    with torch.no_grad():
        for i in picked:
            scene = scenes[i // 5]
            question = rows[i]["question"]
            content = [{"type": "image"}, {"type": "text", "text": question}]
            text = processor.apply_chat_template(
                [{"role": "user", "content": content[::-1] if args.question_first else content}],
                add_generation_prompt=True,
            )
            inputs = processor(images=scene["image"], text=text, return_tensors="pt")
            captured.clear()
            out = model(**inputs, output_hidden_states=True)
            # the asked object: the one the question names (its cell), else (count) all of them
            where = [o for o in scene["objects"] if f"the {o['position']}?" in question or o["colour"] in question]
            asked = torch.zeros(grid, grid, dtype=torch.bool)
            for obj in where or scene["objects"]:
                left, top, right, bottom = (v // pixels_per_code for v in bounding_box(obj))
                asked[top : bottom + 1, left : right + 1] = True
            image_positions = (inputs.input_ids[0] == model.config.image_token_id).nonzero().squeeze(1)
            for layer, weights in enumerate(captured):
                row = weights[0, :, -1].mean(0)  # the answer position, averaged over heads
                on_image = row[image_positions]
                attention[layer] += torch.stack(
                    [on_image[asked.flatten()].sum(), on_image[~asked.flatten()].sum(), 1 - on_image.sum()]
                )
            states.append(torch.stack([h[0, -1] for h in out.hidden_states[1:]]))
            codes = out.image_ids[0].reshape(grid, grid)[asked]
            code_features.append(torch.zeros(model.config.codebook_size).index_add_(0, codes, torch.ones(len(codes))))
            answers.append(rows[i]["answer"])
    for hook in hooks:
        hook.remove()

    attention /= len(picked)
    print(f"{args.model}: {len(picked)} {args.type} questions about {args.n} test scenes")
    print("answer position's attention (mean over heads): asked object / other image tokens / text")
    k = model.config.num_shared_layers
    for layer, (obj, other, text) in enumerate(attention.tolist()):
        where = "shared" if layer < k else "understanding"
        print(f"  layer {layer} ({where}): {obj:.2f} / {other:.2f} / {text:.2f}")
    states = torch.stack(states)
    print("linear probe for the answer (held-out half):")
    print(f"  from the VQ code ids under the asked object: {fit_probe(torch.stack(code_features), answers):.3f}")
    for layer in range(states.shape[1]):
        print(f"  from the answer position after layer {layer}: {fit_probe(states[:, layer], answers):.3f}")
    majority = max(answers.count(a) for a in set(answers)) / len(answers)
    print(f"  (majority answer: {majority:.3f})")
    if args.type == "position":
        named_object_lookup(model, scenes, args.question_first)


if __name__ == "__main__":
    main()
