"""
lm-evaluation-harness on a checkpoint here, without exporting it: an lm_eval model registered as `nanollm`
that scores with evals.py (packed choices, batched by length) and generates with generation.py.

    python lm_eval_nanollm.py --model nanollm --model_args checkpoint=out-shakespeare-char --tasks hellaswag
    python lm_eval_nanollm.py --model nanollm --model_args checkpoint=exports/smollm2,dtype=bfloat16 \\
        --tasks arc_easy,piqa --device cuda --limit 200

The command is lm_eval's own command line (`lm_eval run ...`; every flag of `lm_eval --help`) with the
`nanollm` model registered first. From Python: `import lm_eval_nanollm` then
lm_eval.simple_evaluate(model="nanollm", model_args="checkpoint=..."). model_args: checkpoint (a train.py
out_dir, a checkpoint folder or a Hugging Face folder), tokenizer (a Hugging Face folder whose
tokenizer.json to use instead of the model's own), batch_tokens, dtype (float32, bfloat16, float16).
lm-eval is a test/bench dependency: this module is the only one that imports it.
"""

from __future__ import annotations

import os
import sys
import typing

import lm_eval.models  # noqa: F401  (lm-eval's own models: its registry skips them once ours is in it)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model

import errors
import evals
from generation import generate


class NanoLLM(TemplateLM):
    """lm_eval's LM interface over our GPT: log-likelihoods (plain and rolling) and greedy generation."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None, batch_tokens: int = 8192,
                 dtype: str = "float32", device: str | None = None, batch_size: object = None,
                 max_batch_size: object = None, **unused: object) -> None:
        super().__init__()
        self.model, self.enc, self.what = evals.load_model(checkpoint, tokenizer)
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            print(f"nanollm: --device {device} but no CUDA GPU here; using cpu", file=sys.stderr)  # as lm-eval's hf
            device = "cpu"
        self._device = torch.device(device or "cpu")
        self.model.to(self._device).eval()
        self.batch_tokens = int(batch_tokens)
        dt = getattr(torch, str(dtype))
        self.autocast = (torch.autocast(self._device.type, dtype=dt) if dt != torch.float32 else None)

    @property
    def eot_token_id(self) -> int:
        return self.enc.prefix_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: object) -> list[int]:
        return self.enc.encode(string)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of (context ids, continuation ids) pairs; pairs with the same context
        become one example, so its choices share the context's computation."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(i)
        examples = [evals.Example([("", "")] * len(idx), 0, [1] * len(idx), [pairs[i] for i in idx])
                    for idx in groups.values()]
        scored = evals.loglikelihoods(self.model, self.enc, [examples], self.batch_tokens, self.autocast,
                                      self._device)[0]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for idx, lls, greedy in zip(groups.values(), scored.lls, scored.greedy):
            for i, ll, g in zip(idx, lls, greedy):
                out[i] = (ll, g)
        return out

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: object) -> list:
        results = self._score([(list(ctx), list(cont)) for _, ctx, cont in requests])
        for (key, _, _), r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, r)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood over disjoint windows of max_length tokens, as lm-eval's hf model."""
        out = []
        for (string,) in [req.args for req in requests]:
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(ll for ll, _ in self._score([(list(c), list(x)) for c, x in windows]))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, one request at a time, cut at the first of its stop strings."""
        out = []
        for context, gen_kwargs in [req.args for req in requests]:
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - max_new):] if max_new < self.max_length else []
            prompt = torch.tensor([ids or [self.prefix_token_id]], device=self._device)
            with self.autocast or torch.autocast(self._device.type, enabled=False), torch.no_grad():
                tokens = generate(self.model, prompt, max_new, temperature=0)[0, prompt.shape[1]:].tolist()
            text = self._decode(tokens)
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


if "nanollm" not in model_registry.keys():  # once per process, whether imported or run as a script
    register_model("nanollm")(NanoLLM)

# lm-eval's own definition of each published task, inside the lm_eval package
LM_EVAL_YAML = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml",
                "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml",
                "winogrande": "winogrande/default.yaml", "lambada_openai": "lambada/lambada_openai.yaml"}


def task_yaml(spec: str, lm_eval_name: str) -> str:
    """An lm-eval custom task (put it in a folder given to TaskManager(include_path=...) or --include_path)
    that reads the same local file as evals.load_task(spec): NAME=PATH.jsonl includes lm-eval's own
    definition of NAME with the file as its split; PATH.jsonl (our fields) is written out."""
    import json

    import lm_eval.tasks

    name, _, path = spec.partition("=")
    if not path:
        path, name = name, ""
    q = json.dumps  # a JSON string is a YAML string
    if name:
        if name not in LM_EVAL_YAML:
            raise evals.TaskError(f"no lm-eval definition known for {name!r}; known: {', '.join(LM_EVAL_YAML)}")
        split = evals.TASKS[name].hub[2]
        base = os.path.join(os.path.dirname(lm_eval.tasks.__file__), LM_EVAL_YAML[name])
        return (f"include: {q(base)}\ntask: {q(lm_eval_name)}\ntag: []\ndataset_path: json\ndataset_name: null\n"
                f"dataset_kwargs:\n  data_files:\n    {split}: {q(os.path.abspath(path))}\n"
                f"training_split: null\nvalidation_split: {'validation' if split == 'validation' else 'null'}\n"
                f"test_split: {'test' if split == 'test' else 'null'}\n")
    kind = evals.load_task(path, 1).kind
    fields = {"choice": "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
                        "doc_to_target: label\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n"
                        "  - metric: acc_norm\n",
              "schema": "output_type: multiple_choice\ndoc_to_text: label\ndoc_to_choice: contexts\n"
                        "doc_to_target: continuation\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n",
              "cloze": "output_type: loglikelihood\ndoc_to_text: context\ndoc_to_target: continuation\n"
                       "metric_list:\n  - metric: acc\n"}[kind]
    return (f"task: {q(lm_eval_name)}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {q(os.path.abspath(path))}\ntest_split: test\n{fields}metadata:\n  version: 1.0\n")


def main() -> int:
    """lm_eval's command line with `nanollm` registered (it inserts `run` when no subcommand is given);
    a usage mistake is one `error:` line and exit 2, as in every command here."""
    import argparse

    from lm_eval.__main__ import cli_evaluate

    def usage_error(parser: argparse.ArgumentParser, message: str) -> typing.NoReturn:
        raise errors.ConfigError(f"{message} (see --help)")

    argparse.ArgumentParser.error = usage_error  # lm_eval's parsers and subparsers are plain argparse
    return errors.run_command(lambda: cli_evaluate() or 0)


if __name__ == "__main__":
    sys.exit(main())
