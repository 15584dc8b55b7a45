"""The RQ depth head: per image position, the D residual codes one after another, from the generation branch.

With residual codes an image position holds D codes. The LLM runs once per position; a small causal transformer
over the depth (the official `rqtransformer`, from RQ-VAE's RQ-Transformer) then predicts code 0 from the LLM's
hidden state and code d from the hidden state and the sum of codes 0..d-1:

```
slot 0: hidden_in(llm hidden)          -> code 0
slot d: code_in(sum of code vectors 0..d-1) -> code d          (+ a learned depth position per slot)
```

Its blocks are the official ones: pre-LN, attention at `attention_width` between an in- and an out-projection,
a 4x MLP at `width`; one classifier for every depth. See docs/official/layout.md, section 2.
"""

import torch
from torch import nn


class UniForkDepthAttention(nn.Module):
    """Causal multi-head self-attention over the depth slots (the official `MultiSelfAttention`, through SDPA)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"the depth head's attention width {width} must be a multiple of its {num_heads} heads.")
        self.num_heads = num_heads
        self.query, self.key, self.value, self.proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, slots, width = x.shape
        q, k, v = (
            p(x).view(batch, slots, self.num_heads, -1).transpose(1, 2) for p in (self.query, self.key, self.value)
        )
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, slots, width))


class UniForkDepthBlock(nn.Module):
    def __init__(self, width: int, attention_width: int, num_heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn_in_proj = nn.Linear(width, attention_width)
        self.attn = UniForkDepthAttention(attention_width, num_heads)
        self.attn_out_proj = nn.Linear(attention_width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_out_proj(self.attn(self.attn_in_proj(self.ln1(x))))
        return x + self.mlp(self.ln2(x))


class UniForkDepthHead(nn.Module):
    """Logits over the codebook for each depth slot.

    `forward(hidden, code_vectors)`: `hidden` `(..., hidden_size)` from the generation branch, `code_vectors`
    `(..., n, code_dim)` the vectors of the first n codes of the position (n < depth) -> logits `(..., n + 1,
    codebook_size)`, slot d predicting code d. Teacher forcing passes the first `depth - 1` codes' vectors;
    sampling calls it once per depth with the codes drawn so far (`sample`).
    """

    def __init__(self, hidden_size, code_dim, codebook_size, depth, width, attention_width, num_heads, num_layers):
        super().__init__()
        self.depth = depth
        self.hidden_in = nn.Linear(hidden_size, width)
        self.code_in = nn.Linear(code_dim, width)
        self.depth_position = nn.Parameter(torch.zeros(1, depth, width))
        self.blocks = nn.ModuleList(UniForkDepthBlock(width, attention_width, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, codebook_size)

    @classmethod
    def from_config(cls, config) -> "UniForkDepthHead":
        """The head of a `UniForkConfig` with an `rq_config`."""
        return cls(
            config.text_config.hidden_size,
            config.code_dim,
            config.codebook_size,
            config.image_depth,
            **config.depth_head_config,
        )

    def forward(self, hidden: torch.Tensor, code_vectors: torch.Tensor) -> torch.Tensor:
        given = code_vectors.shape[-2]
        if given >= self.depth or code_vectors.shape[:-2] != hidden.shape[:-1]:
            raise ValueError(
                f"code_vectors must be (..., n < {self.depth}, code_dim) with the leading shape of hidden "
                f"{tuple(hidden.shape[:-1])}, got {tuple(code_vectors.shape)}."
            )
        slots = torch.cat([self.hidden_in(hidden).unsqueeze(-2), self.code_in(code_vectors.cumsum(-2))], -2)
        x = (slots + self.depth_position[:, : given + 1]).reshape(-1, given + 1, slots.shape[-1])
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.norm(x)).reshape(*hidden.shape[:-1], given + 1, -1)

    def teacher_forced(self, hidden: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Training's logits `(..., depth, codebook_size)`: slot d given the true codes 0..d-1 of `codes` `(..., depth)`,
        the position `hidden` predicts. Computed only where there is one (codes >= 0): elsewhere (text, an image's
        last place) the logits are 0, since nothing is predicted there; the head costs about as much as the LLM."""
        known = codes[..., 0] >= 0
        vectors = nn.functional.embedding(codes[known][:, :-1], codebook.to(hidden.dtype))
        logits = hidden.new_zeros(*codes.shape, self.classifier.out_features)
        return logits.index_put((known,), self(hidden[known], vectors))

    def sample(self, hidden: torch.Tensor, codebook: torch.Tensor, pick) -> torch.Tensor:
        """Codes `(..., depth)` for `hidden` `(..., hidden_size)`: at each depth `pick(logits (..., codebook_size),
        depth) -> codes (...)` chooses (greedy, CFG, temperature, top-k / top-p: the caller's), and the chosen
        code's vector joins the prefix of the next depth."""
        vectors = hidden.new_zeros(*hidden.shape[:-1], 0, codebook.shape[-1])
        codes = []
        for depth in range(self.depth):
            codes.append(pick(self(hidden, vectors)[..., -1, :], depth))
            vectors = torch.cat([vectors, codebook[codes[-1]].unsqueeze(-2)], -2)
        return torch.stack(codes, -1)


__all__ = ["UniForkDepthHead"]
