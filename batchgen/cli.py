"""Command line: python -m batchgen <command>.

Exit codes: 0 ok; 1 the work ran but something in it failed (a row, a shard, a check);
2 bad input (spec, model directory, arguments) reported before any work started.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from batchgen.pipeline.spec import SamplingSpec

    # The same default as a job spec's sampling.max_tokens, so the two agree.
    p.add_argument("--max-tokens", type=int, default=SamplingSpec.model_fields["max_tokens"].default,
                   help="most tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-ids", type=_int_list, default=[], help="comma-separated token ids that stop")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    p.add_argument("--logprobs", action="store_true", help="report the sampled tokens' log-probabilities")


def _adapter_args(specs: list[str], chosen: list[str], n_prompts: int) -> tuple[dict[str, str], list[Optional[str]]]:
    """``--adapter NAME=DIR`` (or DIR) options as ``{name: dir}``, and ``--adapter-for`` as each
    prompt's adapter (empty: none given). Raises ValueError with the option at fault."""
    adapters: dict[str, str] = {}
    for item in specs:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        if not name or not path:
            raise ValueError(f"--adapter {item!r}: expected NAME=DIR")
        if name in adapters:
            raise ValueError(f"--adapter {item!r}: adapter {name!r} is given twice")
        adapters[name] = path
    if not chosen:
        return adapters, []
    if len(chosen) not in (1, n_prompts):
        raise ValueError(f"--adapter-for is given {len(chosen)} times for {n_prompts} prompts: give it once "
                         "(every prompt) or once per prompt")
    unknown = sorted({c for c in chosen if c != "-" and c not in adapters})
    if unknown:
        raise ValueError(f"--adapter-for {unknown[0]!r}: no such --adapter (known: {sorted(adapters)})")
    names = [None if c == "-" else c for c in chosen]
    return adapters, names * n_prompts if len(names) == 1 else names


def cmd_generate(args: argparse.Namespace) -> int:
    """One-off generation: every --prompt/--prompt-ids runs in one continuous batch."""
    from batchgen.checkpoint import CheckpointError, load_args
    from batchgen.engine import LLM, SamplingParams
    from batchgen.tokenizer import load_tokenizer

    try:
        conversations = _read_messages(args.messages) if args.messages else []
    except ValueError as e:
        print(f"error: --messages {args.messages}: {e}", file=sys.stderr)
        return 2
    shown: list = list(args.prompt) + list(args.prompt_ids) + conversations  # what each output answers
    prompts: list = list(args.prompt) + list(args.prompt_ids)
    if not shown:
        print("error: give at least one --prompt, --prompt-ids or --messages", file=sys.stderr)
        return 2
    try:
        adapters, per_prompt = _adapter_args(args.adapter, args.adapter_for, len(shown))
        constraint, choices = _task_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            seed=args.seed, stop=args.stop, stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos,
            logprobs=args.logprobs, constraint=constraint, choices=choices, normalize=args.normalize,
        )
        if args.tensor_parallel > 1:
            if adapters:
                raise ValueError("--adapter with --tensor-parallel: run a job (model.adapters) instead")
            if args.device not in (None, "cpu", "cuda"):
                raise ValueError(f"--tensor-parallel takes --device cpu or cuda (one GPU per rank), not {args.device}")
            load_args(args.model)  # a bad model directory is reported here, before Ray starts
            llm, tokenizer = None, load_tokenizer(args.model)
        else:
            llm = LLM(args.model, dtype=args.dtype, device=args.device, adapters=adapters or None,
                      merge_adapter=len(adapters) == 1 and not args.adapter_for, prefix_caching=args.prefix_caching)
            tokenizer = llm.tokenizer
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (args.chat or conversations) and tokenizer is None:
        print(f"error: {'--chat' if args.chat else '--messages'} needs {args.model}/tokenizer.model", file=sys.stderr)
        return 2
    from batchgen.prompts import PromptError, encode_chat

    try:
        if args.chat:
            prompts = [tokenizer.encode_chat_prompt(p, system=args.system) if isinstance(p, str) else p
                       for p in prompts]
        for k, conversation in enumerate(conversations):
            try:
                prompts.append(encode_chat(tokenizer, conversation))
            except PromptError as e:
                raise PromptError(f"--messages {args.messages}: conversation {k}: {e}") from None
    except PromptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if llm is None:  # --tensor-parallel: one N-rank replica on a local Ray
        _local_ray_on_loopback(None)  # before anything imports ray
        from batchgen.pipeline.tp_replica import TPReplicaError, generate_tensor_parallel

        try:
            outs = generate_tensor_parallel(args.model, prompts, params, n=args.tensor_parallel, dtype=args.dtype,
                                            device=args.device, prefix_caching=args.prefix_caching)
        except TPReplicaError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    else:
        plist = [dataclasses.replace(params, adapter=a) for a in per_prompt] if per_prompt else params
        outs = llm.generate(prompts, plist)
    for prompt, out in zip(shown, outs):
        if args.json:
            rec = {"prompt": prompt, "token_ids": out.token_ids, "text": out.text,
                   "finish_reason": out.finish_reason, "error": out.error,
                   "prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids)}
            if args.logprobs:
                rec["logprobs"] = out.logprobs
            if choices is not None:
                rec.update(label=out.label, label_logprobs=out.label_logprobs, label_probs=out.label_probs)
            print(json.dumps(rec, ensure_ascii=False))
        elif out.ok and choices is not None:
            print(f"{out.label}\t" + " ".join(f"{c}={p:.4f}" for c, p in zip(choices, out.label_probs)))
        elif out.ok:
            print(out.text if out.text is not None and tokenizer is not None else " ".join(map(str, out.token_ids)))
        else:
            print(f"error: {out.error}", file=sys.stderr)
    return 0 if all(o.ok for o in outs) else 1


def _task_args(args: argparse.Namespace) -> tuple[Optional[tuple[str, Any]], Optional[list[str]]]:
    """(constraint, choices) from --json-schema/--regex/--choice and --choices; ValueError if unusable."""
    from batchgen.engine.constraints import check_constraint
    from batchgen.pipeline.spec_tasks import load_json_schema

    given = [(k, v) for k, v in (("json_schema", args.json_schema), ("regex", args.regex),
                                 ("choice", args.choice or None)) if v is not None]
    if len(given) + (args.choices is not None) > 1:
        raise ValueError("--json-schema, --regex, --choice and --choices exclude each other")
    choices = [c.strip() for c in args.choices.split(",")] if args.choices is not None else None
    if not given:
        return None, choices
    kind, value = given[0]
    if kind == "json_schema":
        value = load_json_schema(value)
    check_constraint(kind, value)  # ConstraintError is a ValueError
    return (kind, value), None


def _read_messages(path: str) -> list[list]:
    """The conversations in a ``--messages`` JSON file: one list of ``{role, content}`` messages, or a
    list of such lists. Their roles and contents are checked when they are encoded."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read a JSON file: {e}") from None
    if not isinstance(data, list) or not data:
        raise ValueError("expected a non-empty JSON list of messages, or a list of conversations")
    if all(isinstance(c, list) for c in data):
        return data
    if all(isinstance(m, dict) for m in data):
        return [data]
    raise ValueError("expected a list of {\"role\", \"content\"} objects, or a list of such lists (not a mix)")


def _local_ray_on_loopback(address: Optional[str]) -> None:
    """A local Ray must listen on 127.0.0.1 only. Ray reads this switch at import time, so it is
    set before anything imports ray, and only when no cluster is being joined (a driver that
    advertises 127.0.0.1 could not join one)."""
    if not address and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _setup_logging() -> None:
    import logging
    import time

    # ISO-8601 UTC, like every timestamp batchgen writes (_SUCCESS, runs.json, summary.parquet).
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def _load(args: argparse.Namespace):
    """The job spec with --set overrides, or None after printing why it is invalid."""
    from batchgen.pipeline.spec import SpecError, load_spec

    try:
        return load_spec(args.spec, args.set)
    except (SpecError, FileNotFoundError) as e:
        # A SpecError from the file's validation already starts with "invalid job spec FILE:".
        head = "" if getattr(e, "source", None) else f"invalid job spec {args.spec}:\n"
        print(f"error: {head}{e}", file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    """Run a job spec on Ray (the cluster in RAY_ADDRESS, or a local one)."""
    _local_ray_on_loopback(args.address)
    from batchgen.pipeline.driver import JobFailed, JobStopped, run_job
    from batchgen.pipeline.spec import SpecError

    _setup_logging()
    spec = _load(args)
    if spec is None:
        return 2
    try:
        summary = run_job(spec, address=args.address, dashboard=not args.no_dashboard,
                          progress_every_s=args.progress_every)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JobStopped as e:
        print(f"batchgen: {e}", file=sys.stderr)
        return e.exit_code  # 130 for SIGINT, 143 for SIGTERM
    except JobFailed as e:
        print(f"error: job {spec.name} did not complete: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Refuse what ``run`` would, before loading weights or starting Ray: the spec, the model
    directory (config, weight files, their headers against the config, a tokenizer for text
    prompts), the input (schemas, ids), the paths under Ray Jobs and whether the output mode can
    be applied (a resume's spec, input and model fingerprints; error_if_exists)."""
    from batchgen.pipeline.paths import absolute_uri, check_job_paths
    from batchgen.pipeline.planning import check_job
    from batchgen.pipeline.spec import SpecError

    spec = _load(args)
    if spec is None:
        return 2
    try:
        check_job_paths(spec)
        plan, committed = check_job(spec)
    except (SpecError, FileNotFoundError) as e:
        print(f"error: invalid job spec {args.spec}:\n{e}", file=sys.stderr)
        return 2
    files = len({s.relpath for s in plan.shards})
    resume = f" ({len(committed)} committed, resumable)" if committed else ""
    print(f"ok: {spec.name}: {files} file(s), {plan.rows_total} rows, {len(plan.shards)} shards{resume} -> "
          f"{absolute_uri(spec.output.path)}")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    """The first rows' prompts as the model sees them, with token counts (no weights, no Ray)."""
    from batchgen.pipeline.preview import preview
    from batchgen.pipeline.spec import SpecError

    spec = _load(args)
    if spec is None:
        return 2
    try:
        rows = preview(spec, args.rows)
    except (SpecError, FileNotFoundError) as e:
        print(f"error: invalid job spec {args.spec}:\n{e}", file=sys.stderr)
        return 2
    for r in rows:
        if args.json:
            print(json.dumps(r, ensure_ascii=False, default=str))
            continue
        print(f"--- id={r['id']} prompt_tokens={r['prompt_tokens']}" + (f" ({r['note']})" if r["note"] else ""))
        if r["prompt"] is not None:
            print(r["prompt"])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Progress of a running or finished job, read from its output location."""
    from batchgen.pipeline.spec import SpecError
    from batchgen.pipeline.writer import job_status

    try:
        status = job_status(args.output)
    except SpecError as e:  # a damaged manifest.json: say which file, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2, default=str))
    if not status["exists"]:
        print(f"error: no job output at {args.output}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The bundled model on held-out problems, through the whole pipeline on a local Ray."""
    _local_ray_on_loopback(None)
    from batchgen.demo.run import run_demo_args

    _setup_logging()
    return run_demo_args(args)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The CLI's parser; with ``command``, the other mounted commands get no arguments (their
    modules are not imported)."""
    parser = argparse.ArgumentParser(prog="batchgen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate from one or more prompts (one batch)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--model", required=True, help="model directory (Meta or HF layout)")
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    g.add_argument("--prompt-ids", action="append", default=[], type=_int_list,
                   help="prompt token ids, comma-separated, BOS included (repeatable)")
    _add_sampling_args(g)
    g.add_argument("--chat", action="store_true", help="wrap text prompts in the Llama-2-chat format")
    g.add_argument("--system", default=None, help="system prompt for --chat")
    g.add_argument("--messages", default=None, metavar="FILE.json",
                   help="Llama-2-chat conversations: a JSON list of {role, content} messages, or a list of such "
                        "lists (each rendered as Meta's chat_completion does)")
    g.add_argument("--choices", default=None, metavar="A,B,C",
                   help="classify: score these comma-separated choices as each prompt's continuation")
    g.add_argument("--normalize", default="none", choices=["none", "tokens"],
                   help="with --choices: tokens = mean log-prob per token")
    g.add_argument("--json-schema", default=None, metavar="FILE.json", help="structured output: a JSON schema")
    g.add_argument("--regex", default=None, help="structured output: the completion matches this regex")
    g.add_argument("--choice", action="append", default=[], help="structured output: one of these (repeatable)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    g.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N ranks on a local Ray (one GPU each with CUDA, gloo on CPU)")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT LoRA adapter directory (repeatable; a bare DIR is named after it). One adapter "
                        "without --adapter-for runs every prompt, merged into the weights")
    g.add_argument("--adapter-for", action="append", default=[], metavar="NAME",
                   help="the adapter of each prompt in order (--prompt, then --prompt-ids, then --messages); "
                        "'-' = the base model; given once, it applies to every prompt")
    g.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="share the KV blocks of common prompt prefixes between prompts")
    g.set_defaults(func=cmd_generate)

    def spec_parser(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("spec", help="job spec (YAML or JSON)")
        p.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE",
                       help="override a spec field, e.g. --set sampling.max_tokens=32 (repeatable)")
        return p

    r = spec_parser("run", "run a job spec on Ray")
    r.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    r.add_argument("--no-dashboard", action="store_true", help="local Ray without the dashboard")
    r.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    r.set_defaults(func=cmd_run)
    spec_parser("validate", "check a spec, its model and input without running anything").set_defaults(
        func=cmd_validate)
    pv = spec_parser("preview", "the first rows' prompts as the model sees them, with token counts")
    pv.add_argument("--rows", type=int, default=5, help="how many rows")
    pv.add_argument("--json", action="store_true", help="one JSON object per row")
    pv.set_defaults(func=cmd_preview)
    st = sub.add_parser("status", help="progress of a job from its output location")
    st.add_argument("output", help="the job's output.path")
    st.set_defaults(func=cmd_status)

    # Commands whose module brings its own arguments: (name, help, module, its add-arguments and
    # run functions). Only the module of the command being run is imported: bench and demo
    # pull in torch, and `batchgen validate` or `--help` should not wait for it.
    mounted = [
        ("plan", "does a model fit on given GPUs: weights, KV cache, batch per GPU",
         "batchgen.plan", "add_plan_args", "run_plan"),
        ("bench", "tokens/s of the engine against HF generate on a mixed batch (--pipeline: as Ray jobs)",
         "batchgen.bench", "add_bench_args", "run_bench"),
        ("verify", "check that every input row is in the output exactly once",
         "batchgen.pipeline.verify", "add_verify_args", "run_verify"),
        ("demo", "run the bundled model on held-out problems through the pipeline",
         "batchgen.demo.run", "add_demo_args", None),
    ]
    for name, help_text, module, add_name, run_name in mounted:
        p = sub.add_parser(name, help=help_text)
        if command in (None, name):
            mod = importlib.import_module(module)
            getattr(mod, add_name)(p)
            p.set_defaults(func=getattr(mod, run_name) if run_name else cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command is the first word (the top-level parser has no options but --help).
    parser = build_parser(argv[0] if argv and not argv[0].startswith("-") else "")
    args = parser.parse_args(argv)
    return args.func(args)
