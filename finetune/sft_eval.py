"""
Evaluation of a fine-tuned model: token accuracy, greedy answers (generate_answers) and evaluate(), the
eval/* metrics a fine-tuning run logs. The data it reads (examples, tokenization, eval batches) is
sft_data.py's; answer extraction and scoring is answers.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import loop
import parallel
from finetune.answers import answer_accuracy, answer_line_complete
from finetune.sft_data import Encoder
from loss import loss_chunk_tokens


def token_accuracy_counts(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(correct, total) over response targets: argmax of logits (B, T, V) against y (B, T), -1 ignored."""
    valid = y != -1
    correct = (logits.argmax(dim=-1) == y) & valid
    return int(correct.sum()), int(valid.sum())


def token_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of response targets (y != -1) that the argmax of logits (B, T, V) predicts."""
    correct, total = token_accuracy_counts(logits, y)
    return correct / max(1, total)


@torch.no_grad()
def generate_answers(model: torch.nn.Module, examples: Sequence[dict], tokenizer, max_new_tokens: int = 256,
                     batch_size: int = 16, device: str | torch.device = "cpu",
                     between_batches: Callable[[], None] | None = None, progress: bool = False) -> list[str]:
    """Greedy completions (text, cut at EOS) of each example's prompt, tokenized as in training.

    Prompts are batched by length with left padding and decoded with the KV cache (generation.generate),
    so each completion equals decoding its prompt alone. A row stops at EOS or as soon as its answer line
    is complete (`#### N` then a newline: answers.answer_line_complete), since nothing after it is scored.
    Score them with answers.answer_accuracy. between_batches() runs before each batch (the loop's interrupt
    check); progress: a bar over the batches.
    """
    from generation import generate, left_pad

    enc = Encoder(tokenizer)
    prompts = [enc.bos + list(p) for p in enc.encode([e["prompt"] for e in examples])]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    for start in loop.progress(range(0, len(order), batch_size), "decoding answers", -(-len(order) // batch_size),
                               progress):
        if between_batches is not None:
            between_batches()
        rows = order[start:start + batch_size]
        idx, mask = left_pad([prompts[i] for i in rows], pad_id=enc.eos_id, device=device)
        new = generate(model, idx, max_new_tokens, temperature=0, eos_id=enc.eos_id, attention_mask=mask,
                       stop=_answer_line_stop(enc))
        for i, ids in zip(rows, new[:, idx.size(1):].tolist()):
            out[i] = enc.decode(ids[:ids.index(enc.eos_id)] if enc.eos_id in ids else ids)
    model.train(was_training)
    return out


def _answer_line_stop(enc: Encoder) -> Callable[[torch.Tensor], torch.Tensor]:
    """generation.generate's stop: the rows whose last token ends a line that completes a marked answer (the
    decoded row is read only when its last token holds a newline)."""
    def stop(new: torch.Tensor) -> torch.Tensor:
        done = torch.zeros(new.size(0), dtype=torch.bool, device=new.device)
        for r, ids in enumerate(new.tolist()):
            if ids[-1] != enc.eos_id and "\n" in enc.decode(ids[-1:]):
                done[r] = answer_line_complete(enc.decode(ids))
        return done

    return stop


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list, answer_examples: list[dict], tokenizer, *, max_new_tokens: int,
             batch_size: int, autocast, d: parallel.Dist, fsdp: bool = False, progress: bool = False) -> dict[str, float]:
    """eval/loss and eval/token_accuracy over the eval set, eval/answer_accuracy(_flexible) by greedy decoding.

    The loss goes through the model's chunked loss (model(x, y)), and token accuracy is counted by the
    model's own head (GPT.head) called within that forward, chunk by chunk over the response positions
    only: no (B, T, vocab) logits are built.
    Sums over ranks. Under FSDP every forward is collective, so every rank runs every batch (the
    caller gives each rank all of them) and decodes every answer example, and nothing is summed. A stop
    request ends it between batches (loop.check_interrupt) where every rank runs the same batches: one
    process, or FSDP; under DDP the ranks' shares differ by a batch, so the loop honours it afterwards.
    """
    check = (lambda: loop.check_interrupt(d)) if fsdp or d.world_size == 1 else None
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=d.device)  # loss sum, correct, targets

    def counting_head(x: torch.Tensor, y: torch.Tensor | None):
        # inside the forward (FSDP's root weights are gathered): x (B, T, C) the last hidden states; the
        # model's own head (final norm + output head) on the response positions only, chunk by chunk
        xv, yv = x[y != -1], y[y != -1]  # (N, C), (N,)
        for xc, yc in zip(xv.split(chunk), yv.split(chunk)):
            logits, _ = head(xc[None], None)  # (1, c, V)
            sums[1] += (logits[0].argmax(-1) == yc).sum()
        return head(x, y)

    head, chunk = model.head, loss_chunk_tokens(model.config.vocab_size)  # at most one loss chunk of logits
    shadowed = model.__dict__.get("head")  # compile_mode="blocks" puts a compiled head there
    model.head = counting_head  # an instance attribute shadows the method for this evaluation
    try:
        for x, y in loop.progress(batches, "evaluating", enabled=progress):
            if check is not None:
                check()
            with autocast:
                _, loss = model(x, y)  # the mean over y's valid positions, chunk by chunk
            n = (y != -1).sum()
            sums[0] += loss.double() * n
            sums[2] += n
    finally:
        if shadowed is None:
            del model.head  # the method again
        else:
            model.head = shadowed
    if d.world_size > 1 and not fsdp:
        import torch.distributed as dist

        dist.all_reduce(sums)
    metrics = {"eval/loss": float(sums[0] / sums[2].clamp(min=1)),
               "eval/token_accuracy": float(sums[1] / sums[2].clamp(min=1))}
    if answer_examples:
        mine = answer_examples if fsdp else answer_examples[d.rank::d.world_size]
        with autocast:
            texts = generate_answers(model, mine, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     device=d.device, between_batches=check, progress=progress)
        acc = answer_accuracy(texts, [e["answer"] for e in mine])
        counts = torch.tensor([acc["strict"] * len(mine), acc["flexible"] * len(mine), len(mine)],
                              dtype=torch.float64, device=d.device)
        if d.world_size > 1 and not fsdp:
            import torch.distributed as dist

            dist.all_reduce(counts)
        metrics["eval/answer_accuracy"] = float(counts[0] / counts[2])
        metrics["eval/answer_accuracy_flexible"] = float(counts[1] / counts[2])
    model.train()
    return metrics
