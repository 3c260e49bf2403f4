"""samples.jsonl rows: a few groups of a step, with texts, rewards, advantages, tokens and their sampled
log-probs, images and (grounding tasks) boxes; what the demo's rollout inspector reads. Written through
`RunLogger.samples`, which cuts them back on resume like metrics.jsonl.
"""

from __future__ import annotations

from gpg_vl.boxes import grounding_boxes
from gpg_vl.images import message_images
from gpg_vl.logger import RunLogger


def log_samples(logger: RunLogger, step: int, groups, group_size: int, count: int, advantages=None, tokenizer=None, task=None) -> None:
    """Write `count` groups to samples.jsonl: per group the prompt text, `valid`, and per completion its text,
    reward, reward components, advantage, and its tokens with their sampled log-probs (what the demo's
    rollout inspector shows); every prompt image; for a grounding task the true box and each completion's
    box in original-image pixels. `prompt`, `completions` and `rewards` keep their meaning for older readers."""
    rollout = groups.rollout

    def token_pieces(ids: list[int]) -> list[str]:
        # One string per token that together spell the text (special tokens kept). Trap: a byte-level BPE
        # token can hold part of a UTF-8 character, which decodes alone to U+FFFD; such a token gets "" and
        # the token that completes the character gets all of it (at most 4 bytes are held back).
        pieces, start = [], 0
        for i in range(len(ids)):
            text = tokenizer.decode(ids[start : i + 1])
            if text.endswith("\ufffd") and i - start < 3 and i + 1 < len(ids):
                pieces.append("")
                continue
            pieces.append(text)
            start = i + 1
        return pieces

    rows, images = [], []
    for g in range(min(count, len(groups.examples))):
        span = range(g * group_size, (g + 1) * group_size)
        text = next((item["text"] for m in groups.prompts[g] if isinstance(m["content"], list) for item in m["content"] if item.get("type") == "text"), "")
        row = {
            "prompt": text,
            "completions": [rollout.texts[i] for i in span],
            "rewards": [float(groups.rewards[i]) for i in span],
            "components": [dict(groups.components[i]) for i in span],
            "valid": bool(groups.valid[g]),
            "finish_reasons": [rollout.finish_reasons[i] for i in span],
        }
        if advantages is not None:
            row["advantages"] = [float(advantages[i]) for i in span]
        if tokenizer is not None:
            lengths = [int(rollout.response_mask[i].sum()) for i in span]  # generated tokens, EOS included
            ids = [rollout.completion_ids[i, :n].tolist() for i, n in zip(span, lengths)]
            row["tokens"] = [token_pieces(seq) for seq in ids]
            row["logprobs"] = [[round(float(v), 4) for v in rollout.logprobs[i, :n]] for i, n in zip(span, lengths)]
        found = message_images(groups.prompts[g])
        if task is not None and found:
            row.update(grounding_boxes(task, groups.examples[g], [rollout.texts[i] for i in span], found[0].size))
        rows.append(row)
        images.append(found)
    logger.samples(step, rows, images)
