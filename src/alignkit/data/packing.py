"""Packing several samples into one training row, and collation into padded tensors.

Packed rows carry `position_ids` that restart at 0 for each sample and no attention mask. With
`attention_mask=None`, `use_cache=False` and such position ids, transformers (5.x) finds the
segments from the position-id resets and builds a block-diagonal causal mask (for sdpa and eager
attention), so no sample attends to another: packed logits equal unpacked ones. The label of each
sample's first token is -100, so the last token of one sample is never trained to predict the
next sample's first token (transformers shifts labels by one).
"""

from __future__ import annotations

import torch

from alignkit.data.chat import IGNORE_INDEX


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin indices of `lengths` by first-fit decreasing into bins of `capacity`.

    A max segment tree over bin capacities finds the first bin that fits in O(log n), so
    packing stays fast for large datasets. Ties in length keep input order (deterministic).
    """
    n = len(lengths)
    size = 1
    while size < n:
        size *= 2
    # Leaf b holds bin b's free space; unopened bins start full, so the first fitting leaf is
    # either an open bin or the next bin to open.
    tree = [0] * (2 * size)
    tree[size : size + n] = [capacity] * n
    for node in range(size - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
    bins: list[list[int]] = []
    for index in sorted(range(n), key=lambda i: (-lengths[i], i)):
        need = lengths[index]
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        if node - size == len(bins):
            bins.append([])
        bins[node - size].append(index)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Pack examples ({"input_ids", "labels"} lists) into rows of at most `max_length` tokens.

    Each row: input_ids, labels (first label of every sample set to -100), position_ids
    (0, 1, ... restarting per sample) and n_samples. Greedy first-fit decreasing; deterministic.
    """
    lengths = [len(e["input_ids"]) for e in examples]
    for i, length in enumerate(lengths):
        if not 0 < length <= max_length:
            raise ValueError(f"example {i} has {length} tokens; packing needs 1..{max_length}")
    rows = []
    for members in first_fit_decreasing(lengths, max_length):
        row: dict = {"input_ids": [], "labels": [], "position_ids": [], "n_samples": len(members)}
        for index in members:
            example = examples[index]
            row["input_ids"].extend(example["input_ids"])
            row["labels"].append(IGNORE_INDEX)
            row["labels"].extend(example["labels"][1:])
            row["position_ids"].extend(range(len(example["input_ids"])))
        rows.append(row)
    return rows


def chunk_stream(
    ids: list[int], max_length: int, separator_id: int, drop_last: bool = True
) -> list[dict]:
    """Cut a stream of concatenated documents into rows of exactly `max_length` tokens.

    Labels equal the ids; position_ids restart at 0 after every `separator_id` (and at each row
    start), so documents are isolated from each other by the block-diagonal mask. The last,
    shorter piece is dropped unless drop_last=False (then it becomes a shorter final row).
    """
    rows = []
    for start in range(0, len(ids), max_length):
        piece = ids[start : start + max_length]
        if len(piece) < max_length and drop_last:
            break
        positions, position = [], 0
        for token in piece:
            positions.append(position)
            # The separator ends its document; the token after it starts a new one.
            position = 0 if token == separator_id else position + 1
        rows.append({"input_ids": piece, "labels": list(piece), "position_ids": positions})
    return rows


def collate(rows: list[dict], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one.

    Returns input_ids[B,T] (pad_id on padding), labels[B,T] (-100 on padding) and either
    position_ids[B,T] (packed: the rows' own, with padding counting 0, 1, ... as a segment of
    its own; no attention mask) or attention_mask[B,T] (unpacked: 1 on real tokens).
    """
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    extra = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[b, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(row["labels"], dtype=torch.long)
        if packed:
            positions = row.get("position_ids") or list(range(n))
            extra[b, :n] = torch.tensor(positions, dtype=torch.long)
            extra[b, n:] = torch.arange(width - n)
        else:
            extra[b, :n] = 1
    key = "position_ids" if packed else "attention_mask"
    return {"input_ids": input_ids, "labels": labels, key: extra}
