"""The `medc` command line. Heavy modules (torch, onnxruntime, transformers) are imported inside each command, so
`medc --help` is instant and the runtime commands (run, verify, inspect, bench) work without torch."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
from pathlib import Path

import click

from medc import __version__
from medc.errors import MedcError


def _friendly(fn):
    """Turn MedcError into a one-paragraph message and an exit code; never a traceback for user errors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedcError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written.", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="medc")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def main(verbose: int, quiet: bool) -> None:
    """medc: compile MedSigLIP / MedGemma to verified ONNX (and TensorRT) bundles for hospital edge devices."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    try:
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False, console=_stderr_console())
    except ImportError:  # pragma: no cover - rich is a dependency
        handler = logging.StreamHandler()
    # Libraries that log through the root logger directly (onnxruntime.quantization's "consider pre-processing")
    # say nothing a medc user can act on: keep only their errors.
    handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.ERROR)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    for noisy in ("onnxscript", "torch", "transformers", "onnx_ir", "onnxruntime"):
        logging.getLogger(noisy).setLevel(max(level, logging.ERROR))


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _trust_option(fn):
    return click.option("--trust", "trust", multiple=True, type=click.Path(path_type=Path, exists=True),
                        help="Trusted public key (.pub) or a folder of them (repeatable): refuse bundles not signed "
                             "by one. Default: MEDC_TRUSTED_KEYS (os.pathsep-separated).")(fn)


def _trust(paths):
    """The site's trusted keys: --trust, else MEDC_TRUSTED_KEYS, else None (unsigned bundles allowed)."""
    from medc.signing import Trust

    return Trust.load(paths) if paths else Trust.from_env()


@main.command()
@click.argument("model")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=False,
              help="Bundle directory to write (default: bundles/MODEL-PRECISION).")
@click.option("--precision", default=None,
              help="A preset (fp32 | fp16 | bf16 | int8 | int4, see README) or per component: "
                   "vision_encoder=int8,decoder=int4,lm_head=int8. Default: the target's (cpu: fp32).")
@click.option("--recipe", type=click.Path(path_type=Path), help="Recipe file (JSON/TOML): a precision per component "
              "and quantisation options; replaces --precision.")
@click.option("--flavour", type=click.Choice(["ort", "portable"]), default=None,
              help="Decoder graph: ONNX Runtime fused ops, or standard ops for TensorRT (default: the target's).")
@click.option("--target", default="cpu", show_default=True, help="Deployment target (see `medc targets`).")
@click.option("--backend", type=click.Choice(["ort", "openvino", "auto"]), default=None,
              help="CPU targets, encoders: ONNX Runtime forms, OpenVINO IR forms (medc[openvino]), or both, gated "
                   "and timed, keeping the fastest that passes. Default: ort (bf16 components: openvino).")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Folder of PNG, JPEG or DICOM images for int8 calibration.")
@click.option("--random-weights", is_flag=True, help="Real architecture, random weights (latency work; not clinical).")
@click.option("--allow-degraded", is_flag=True, help="Keep components that fail the fidelity gate (recorded).")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--pad-to-square", is_flag=True, help="Zero-pad images to square before resizing (Google's MedSigLIP eval).")
@click.option("--optimizer", type=click.Choice(["xformers", "none"]), default="xformers", show_default=True)
@click.option("--context", type=click.IntRange(min=16), default=None,
              help="Tokens of context the bundle must serve (memory check, TensorRT profiles). Default 4096.")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Largest batch the bundle must serve (memory check, TensorRT profiles).")
@click.option("--sign-key", type=click.Path(path_type=Path, dir_okay=False),
              help="Sign the bundle's manifest with this private key (from `medc keygen`).")
@click.option("--vocab", "vocab", type=click.Path(path_type=Path, dir_okay=False),
              help="A token list from `medc vocab`: the decoder's lm_head keeps only its rows (reduced vocabulary).")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(path_type=Path),
              help="A PEFT LoRA (or DoRA) adapter folder to merge before export (repeatable); gated against the "
                   "base with the adapter applied unmerged.")
@click.option("--adapter-scale", type=float, default=1.0, show_default=True,
              help="Multiplies each adapter's strength (alpha / r).")
@click.option("--adapter-slot", "adapter_slots", multiple=True, type=click.Path(path_type=Path),
              help="A PEFT LoRA adapter kept apart and activated per request (`medc run --adapter NAME`, model "
                   "BASE:NAME in medc serve); the decoder gets LoRA slots for the modules these adapters target.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the memory check, and exit (1 if it does not fit).")
@click.option("--stream", is_flag=True, hidden=True,
              help="Stream weights (compile/stream.py) even for a model that fits in memory (tests).")
@_friendly
def build(model, out, precision, recipe, flavour, target, backend, calibration, random_weights, allow_degraded, force,
          pad_to_square, optimizer, context, max_batch, sign_key, vocab, adapters, adapter_scale, adapter_slots,
          dry_run, stream):
    """Build a bundle from MODEL: a registry name (see `medc models`), a local Hugging Face checkpoint directory, or a
    Gemma 3 GGUF file."""
    from medc.compile.build import BuildOptions, build as run_build
    from medc.targets import get_target

    if (Path(model) / "manifest.json").is_file():
        raise MedcError(f"{model} is a bundle already. To build its TensorRT engines on the device, run "
                        f"`medc engines {model}`; to rebuild it, pass the model it was built from.")
    precision = precision or get_target(target).default_precision
    label = Path(recipe).stem if recipe else precision.replace("=", "-").replace(",", "_")
    out = out or Path("bundles") / f"{Path(model).name}-{label}"
    opts = BuildOptions(model=model, out=out, precision=precision, recipe=recipe, flavour=flavour, target=target,
                        calibration=calibration,
                        random_weights=random_weights, allow_degraded=allow_degraded, force=force,
                        pad_to_square=pad_to_square, optimizer=optimizer, stream=stream, context=context,
                        max_batch=max_batch, sign_key=sign_key, backend=backend, vocab=vocab,
                        adapters=tuple(adapters), adapter_scale=adapter_scale, adapter_slots=tuple(adapter_slots))
    if dry_run:
        from medc.compile import planner
        from medc.compile.plan import make_plan, resolve

        resolved = resolve(opts.model, opts.random_weights)
        plan = make_plan(opts, resolved)
        click.echo(plan.render())
        if vocab is not None:
            from medc.compile.vocab import read as read_vocab

            kept = read_vocab(vocab)
            click.echo(f"  vocab: the decoder's lm_head keeps {len(kept.ids)} of {kept.vocab_size} token ids ({vocab}; "
                       "its tokenizer is checked when the model is loaded)")
            plan = dataclasses.replace(plan, lm_head_rows=len(kept.ids))
        memory = planner.plan_build(plan)
        click.echo(memory.render())
        if not memory.fits and get_target(target).usable_memory_gib is not None:
            planner.check_fits(resolved, opts, plan)  # raises with the preset that would fit
        return
    import signal

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    def _terminate(signum, frame):  # SIGTERM (a killed job) cleans up like Ctrl-C: no half bundle, no temp dirs
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    console = _stderr_console()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("building", total=None)

        def step(msg: str) -> None:
            logging.getLogger("medc.build").info(msg)
            bar.update(task, description=msg)

        manifest = run_build(opts, progress=step)
    click.echo(f"built {out}")
    click.echo(_summary(manifest))


@main.command()
@click.argument("corpus", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The list to write (JSON): token ids, their tokenizer's digest, counts; no text.")
@click.option("--model", "model", default=None,
              help="Whose tokenizer: a registry name, checkpoint folder or GGUF file (the MODEL you will build), or a "
                   "bundle built from it.")
@_friendly
def vocab(corpus, out, model):
    """List the token ids a site's texts use (CORPUS: text files or folders of them), plus every special and
    byte-fallback token, for `medc build --vocab`."""
    from medc.compile import vocab as vocab_list

    made = vocab_list.make(list(corpus), vocab_list.tokenizer_file(model))
    vocab_list.write(made, out)
    click.echo(f"wrote {out}: {len(made.ids)} of {made.vocab_size} token ids ({made.counts['corpus']} from "
               f"{made.corpus['tokens']} tokens in {made.corpus['files']} files, {made.counts['special']} special, "
               f"{made.counts['byte_fallback']} byte-fallback)")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", default=None, help="Refuse the bundle unless it was built for this target.")
@click.option("--sign-key", type=click.Path(path_type=Path, dir_okay=False),
              help="Sign the engines' record with this device's private key (from `medc keygen`).")
@_trust_option
@_friendly
def engines(bundle, target, sign_key, trust):
    """Build BUNDLE's TensorRT engines in place, on the device that will run them (needs TensorRT there).

    BUNDLE is a TRT-ready bundle from `medc build MODEL --target T` (T a TensorRT target); the engines, their TensorRT
    version, GPU and sha256 go into a record of their own (records/tensorrt.json), signed with --sign-key: the
    build's manifest and its signature stay as they were."""
    from medc.compile.tensorrt import finish_engines
    from medc.signing import load_private

    key = load_private(sign_key) if sign_key else None
    manifest = finish_engines(Path(bundle), target, log=lambda m: logging.getLogger("medc.build").info(m),
                              sign_key=key, trust=_trust(trust))
    click.echo(f"engines built in {bundle}")
    click.echo(_summary(manifest))


def _summary(manifest) -> str:
    lines = []
    for name, c in manifest.components.items():
        w = c.fidelity["worst"]
        method = c.quantization.get("method", "none")
        gate = "PASS" if c.fidelity.get("passed") is True else "DEGRADED"
        lines.append(f"  {name:<16} {c.precision:<5} {method:<16} cosine {w['cosine']:.6f}  "
                     f"max abs {w['max_abs']:.2e}  {gate}")
    gate = manifest.build.get("generation_gate")
    if gate and "perplexity" in gate:
        lines.append(f"  whole model ({gate['rule']}): greedy {sum(gate['greedy_prefix_agreement'])}/"
                     f"{gate['greedy_new_tokens'] * len(gate['greedy_prefix_agreement'])} tokens agree, perplexity "
                     f"{gate['perplexity']:.4f} vs {gate['reference_perplexity']:.4f} ({gate['perplexity_increase']:+.2%}), "
                     + (f"KL {gate['kl_mean']:.2e}, " if "kl_mean" in gate else "")
                     + f"top-1 {gate['top1_agreement']:.2%}  " + ("PASS" if gate["passed"] else "DEGRADED"))
        if "vocab" in gate:  # a reduced vocabulary: the rate of held-out tokens it cannot produce
            v = gate["vocab"]
            lines.append(f"  reduced vocabulary: {v['size']} tokens, out-of-list rate {v['out_of_list_rate']:.2%} of "
                         f"held-out tokens (reported, not gated); the reduction itself changes in-list perplexity "
                         f"{v['reduction_effect']:+.2%} (fp32)")
    if not manifest.model.get("clinical_use"):
        lines.append(f"  WARNING: {manifest.model.get('warning')}")
    return "\n".join(lines)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
@_friendly
def inspect(bundle, as_json):
    """Print a bundle's manifest readably."""
    from medc.manifest import Manifest

    m = Manifest.read(bundle)
    if as_json:
        click.echo(json.dumps(m.to_json(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    src = m.model.get("source", {})
    console.print(f"[bold]{m.model['name']}[/] ({m.model['hf_class']}, source: {src.get('kind')}) "
                  f"target [bold]{m.target}[/], format {m.format_version}, built {m.created}")
    if not m.model.get("clinical_use"):
        console.print(f"[bold red]{m.model.get('warning')}[/]")
    table = Table("component", "precision", "method", "worst cosine", "max abs", "gate")
    for name, c in m.components.items():
        w = c.fidelity["worst"]
        table.add_row(name, c.precision, c.quantization.get("method", "none"), f"{w['cosine']:.6f}",
                      f"{w['max_abs']:.2e}", "pass" if c.fidelity.get("passed") is True else "DEGRADED")
    console.print(table)
    for name, c in m.components.items():
        sig = lambda ts: ", ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in ts)  # noqa: E731
        fused = ", ".join(f"{k} {v}" for k, v in c.optimizations.get("fused", {}).items()) or "nothing"
        console.print(f"[bold]{name}[/] {c.file}: {sig(c.inputs)} -> {sig(c.outputs)}")
        console.print(f"  fused ({c.optimizations.get('optimizer')}): {fused}")
        calib = c.quantization.get("calibration")
        if calib:
            console.print(f"  calibration: {calib['source']}, {calib['count']} samples, digest {calib['digest'][:16]}")
    console.print("toolchain: " + ", ".join(f"{k} {v}" for k, v in m.toolchain.items()))
    console.print(f"build: {m.build}")
    console.print(f"files ({len(m.files)}): " + ", ".join(f"{f} {h[:12]}" for f, h in m.files.items()))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@_trust_option
@_friendly
def verify(bundle, trust):
    """Check BUNDLE's signatures against the trusted keys and every file's sha256, then re-run the fidelity gate from
    its golden inputs, without torch (on the device it runs on)."""
    from medc.runtime.bundle import open_bundle
    from medc.runtime.verify import verify_bundle

    opened = open_bundle(bundle, trust=_trust(trust))
    for line in opened.check.chain:
        click.echo(line)
    report = verify_bundle(opened)
    ok = True
    for name, r in report.items():
        w = r["worst"]
        ok &= r["passed"]
        click.echo(f"{name:<16} cosine {w['cosine']:.6f}  max abs {w['max_abs']:.2e}  "
                   f"{'PASS' if r['passed'] else 'FAIL'}")
    if not ok:
        raise MedcError("the bundle no longer meets its fidelity gate on this machine.")
    signed = "signatures trusted" if opened.check.trusted else (
        "manifest signed (signature not checked: no trusted keys)" if opened.check.signed else "manifest unsigned")
    click.echo(f"verified: files intact, {signed}, fidelity gate passed.")


@main.command()
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True,
              help="Writes OUT.key (private, mode 0600: keep it off the devices) and OUT.pub (give it to the sites).")
@_friendly
def keygen(out):
    """Make an Ed25519 key pair for signing bundles (`medc build --sign-key`, `medc sign`) or a device's engines."""
    from medc.signing import generate, load_public

    key, pub = generate(out)
    click.echo(f"wrote {key} (private) and {pub} (public, key {load_public(pub).key_id})")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Private key (.key).")
@_friendly
def sign(bundle, key):
    """Sign BUNDLE's manifest (after checking every file against it) with a private key from `medc keygen`."""
    from medc.runtime.bundle import sign_bundle
    from medc.signing import load_private

    click.echo(sign_bundle(bundle, load_private(key)))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="Image file (repeatable).")
@click.option("--labels", help="MedSigLIP: comma-separated labels for zero-shot classification.")
@click.option("--text", "texts", multiple=True, help="MedSigLIP: text to embed (repeatable).")
@click.option("--prompt", help="MedGemma: the question or text to continue (with --image for image questions).")
@click.option("--max-new-tokens", default=256, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int, help="Sampling seed (reproducible answers).")
@click.option("--target", default=None, help="Refuse the bundle unless it was built for this target.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the embedding vectors).")
@click.option("--dicom-config", type=click.Path(path_type=Path), help="TOML file of per-modality DICOM recipes.")
@click.option("--slices", type=click.IntRange(min=1), default=None,
              help="MedGemma: slices of a CT/MR volume (--image SERIES_DIR)  [default: as many as the context and the "
                   "memory plan hold].")
@click.option("--adapter", default=None, help="MedGemma: a run-time LoRA adapter of the bundle (built with "
                                              "--adapter-slot or added with `medc adapter add`).")
@_trust_option
@_friendly
def run(bundle, images, labels, texts, prompt, max_new_tokens, temperature, top_k, top_p, seed, target, threads,
        as_json, dicom_config, slices, adapter, trust):
    """Run a bundle: MedSigLIP zero-shot scores or embeddings; MedGemma answers (streamed).

    --image takes PNG, JPEG or DICOM: a .dcm file or a series folder (README, DICOM)."""
    from medc import runtime

    with runtime.load(bundle, target=target, threads=threads, trust=_trust(trust)) as model:
        if hasattr(model, "generate"):
            if not prompt:
                raise MedcError("a MedGemma bundle needs --prompt TEXT (and --image FILE for image questions).")
            inputs, records = _image_inputs(images, dicom_config, slices, model, prompt, max_new_tokens)
            _generate(model, prompt, inputs, dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                                  top_k=top_k, top_p=top_p, seed=seed, adapter=adapter), as_json,
                      records)
            return
        if adapter:
            raise MedcError("--adapter is for MedGemma bundles built with run-time adapters.")
        if prompt:
            raise MedcError("--prompt is for MedGemma bundles; this bundle embeds images and texts (--image, --text).")
        if slices:
            raise MedcError("--slices is for MedGemma bundles (a volume as several images); MedSigLIP embeds the "
                            "middle slice of a series.")
        inputs, records = _image_inputs(images, dicom_config)
        _siglip_run(model, inputs, labels, texts, as_json, records)


def _image_inputs(paths, dicom_config=None, slices=None, model=None, prompt=None, max_new_tokens=0):
    """--image paths -> (inputs, records): PNG/JPEG stay paths; a DICOM file or series folder is read by
    runtime/dicom.py (for MedGemma a CT/MR volume as K evenly spaced slices, K fitted to the bundle's context and
    memory plan: runtime/gemma.py max_slices).
    records: per input, its file name and, for DICOM, the recipe applied (no patient data)."""
    from medc.runtime.preprocess import is_dicom_file

    dicom = [p for p in paths if p.is_dir() or (p.is_file() and is_dicom_file(p))]
    if not dicom:
        if dicom_config:
            raise MedcError("--dicom-config is for DICOM --image inputs (a .dcm file or a series folder).")
        return list(paths), [{"image": Path(p).name} for p in paths]
    from medc.runtime.dicom import DicomConfig, load_config, read_dicom, read_volume
    from medc.runtime.gemma import max_slices, prompt_positions

    config = load_config(dicom_config) if dicom_config else DicomConfig()
    fit = max_slices(model.assets, prompt, max_new_tokens) if model is not None else None
    k = slices or (max(1, fit - (len(paths) - 1)) if fit is not None else None)
    inputs, records = [], []
    for p in paths:
        if p not in dicom:
            inputs.append(p)
            records.append({"image": p.name})
            continue
        ims = read_dicom(p, config) if k is None else read_volume(p, k, config)
        inputs += ims
        records += [{"image": p.name, "frame": im.ref.frame, "dicom": im.recipe} for im in ims]
    if fit is not None and len(inputs) > fit:
        a = model.assets
        room = (f"context of {a.max_positions} tokens" if prompt_positions(a) == a.max_positions else
                f"memory plan, which leaves {prompt_positions(a)} of its {a.max_positions} positions")
        raise MedcError(f"{len(inputs)} images ({a.mm_tokens_per_image} tokens each) with this prompt "
                        f"and --max-new-tokens {max_new_tokens} do not fit this bundle's {room}, which holds {fit}; "
                        f"pass --slices {max(1, fit)} or fewer, or rebuild with a longer --context.")
    return inputs, records


def _generate(model, prompt, images, params, as_json, records=None):
    """Stream the answer as it is decoded; --json prints it whole at the end."""
    from medc.runtime.textstream import TextStream

    text = TextStream(model.assets.tokenizer)  # decodes only the newest ids each step, as the server does
    pieces: list[str] = []
    for step in model.stream([prompt], images=[images] if images else None, **params):
        if step[0] is not None:
            pieces.append(text.push(step[0])[0])
            if not as_json:
                click.echo(pieces[-1], nl=False)
    pieces.append(text.flush()[0])
    if not as_json:
        click.echo(pieces[-1], nl=False)
    ids, shown = text.ids, "".join(pieces)
    # A random-weights build carries a placeholder tokenizer (a few hundred pieces): most generated ids decode to
    # nothing, so the ids themselves are what shows that the bundle generated.
    placeholder = bool(model.bundle.manifest.tokenizer.get("placeholder"))
    if as_json:
        click.echo(json.dumps({"prompt": prompt, "answer": shown, "tokens": len(ids),
                               **({"images": records} if records else {}),
                               **({"token_ids": ids} if placeholder else {})}))
    else:
        click.echo()
        if placeholder:
            click.echo(f"(placeholder tokenizer of a random-weights build; {len(ids)} token ids: {ids})", err=True)


def _siglip_run(model, images, labels, texts, as_json, records=None):
    records = records or [{"image": Path(p).name} for p in images]
    if not images and not texts:
        raise MedcError("nothing to run: pass --image FILE (with --labels for zero-shot) and/or --text TEXT.")
    result = {}
    if images and labels:
        label_list = [l.strip() for l in labels.split(",") if l.strip()]
        probs = model.zero_shot(images, label_list)
        result["zero_shot"] = [{**r, "scores": dict(zip(label_list, map(float, row)))}
                               for r, row in zip(records, probs)]
    elif images:
        emb = model.embed_images(images)
        result["image_embeds"] = [{**r, "shape": list(e.shape), "norm": float((e @ e) ** 0.5),
                                   **({"vector": e.tolist()} if as_json else {})} for r, e in zip(records, emb)]
    if texts:
        emb = model.embed_texts(texts)
        result["text_embeds"] = [{"text": t, "shape": list(e.shape), "norm": float((e @ e) ** 0.5),
                                  **({"vector": e.tolist()} if as_json else {})} for t, e in zip(texts, emb)]
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for r in result.get("zero_shot", []):
        click.echo(r["image"] + ":")
        for label, p in sorted(r["scores"].items(), key=lambda kv: -kv[1]):
            click.echo(f"  {p:7.4f}  {label}")
    for key in ("image_embeds", "text_embeds"):
        for r in result.get(key, []):
            click.echo(f"{r.get('image', r.get('text'))}: {key[:-1]} shape {r['shape']} norm {r['norm']:.6f}")


def _ints(option: str, text: str, allow_zero: bool = False) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MedcError(f"{option} takes comma-separated integers, e.g. {option} 1,4 (got {text!r}).") from None
    if any(v < (0 if allow_zero else 1) for v in values):
        raise MedcError(f"{option} takes {'non-negative' if allow_zero else 'positive'} integers (got {text!r}).")
    return values


@main.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--batch", default="1", show_default=True, help="Comma-separated batch sizes.")
@click.option("--threads", default="", help="Comma-separated intra-op thread counts (default: the runtime's).")
@click.option("--repeat", default=None, type=int,
              help="Timed rounds  [default: 10; generative bundles: 3].")
@click.option("--warmup", default=None, type=int, help="Untimed rounds first  [default: 2; generative bundles: 1].")
@click.option("--component", "components", multiple=True, help="Embedding bundles: only these components.")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice(["torch", "llama.cpp", "ort-genai", "openvino-genai"]),
              help="Also time this baseline in the same rounds (repeatable): HF PyTorch eager fp32 (medc[build]), "
                   "llama.cpp on the GGUF source, ONNX Runtime GenAI, OpenVINO GenAI (medc[baselines]).")
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="The checkpoint or GGUF the bundles were built from (baselines, roofline), where medc cannot "
                   "find it.")
@click.option("--prompt-tokens", default="512", show_default=True,
              help="Generative bundles: comma-separated prompt lengths in tokens (template included).")
@click.option("--new-tokens", default="128", show_default=True,
              help="Generative bundles: comma-separated greedy tokens per run.")
@click.option("--images", default="0", show_default=True,
              help="Generative bundles: 0 (text prompt) and/or 1 (one image), comma-separated.")
@click.option("--past", default="", help="Generative bundles: also time decode with this many tokens in the KV "
                                          "cache, comma-separated (0 = the main run only).")
@click.option("--past-new-tokens", default=32, show_default=True,
              help="Generative bundles: tokens decoded per --past measurement.")
@click.option("--format", "fmt", type=click.Choice(["md", "json", "jsonl", "csv"]), default="md", show_default=True,
              help="What stdout gets (progress goes to stderr).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the result as JSON to PATH.")
@click.option("--title", default=None, help="A title for the result (reports show it).")
@click.option("--no-probe", is_flag=True, help="Skip the host probe (then rows carry no roofline floor).")
@_friendly
def bench(bundles, batch, threads, repeat, warmup, components, baselines, source, prompt_tokens, new_tokens, images,
          past, past_new_tokens, fmt, json_out, title, no_probe):
    """Latency, throughput and memory of bundles, swept over parameters and interleaved round by round.

    Every combination of --batch, --threads, --prompt-tokens, --new-tokens, --images and --past; every bundle and
    baseline runs each case once per round, so this machine's drift hits them alike. Embedding bundles: latency and
    items/s per component. Generative bundles: TTFT, TPOT, prefill and decode tok/s, end-to-end latency, vision
    encoder ms. All: cold-start load time, memory, and the roofline floor on this machine (a short probe of its
    GEMM and memory peaks runs between rounds)."""
    from medc.benchmarks import schema
    from medc.benchmarks.bench import bench as run_bench
    from medc.benchmarks.sweep import Sweep
    from medc.manifest import Manifest

    generative = Manifest.read(bundles[0]).model.get("family") == "gemma3"
    sweep = Sweep(batch=_ints("--batch", batch), threads=_ints("--threads", threads) or (None,),
                  components=tuple(components), prompt_tokens=_ints("--prompt-tokens", prompt_tokens),
                  new_tokens=_ints("--new-tokens", new_tokens), images=_ints("--images", images, allow_zero=True),
                  past=tuple(p for p in _ints("--past", past, allow_zero=True) if p), past_new_tokens=past_new_tokens,
                  repeat=repeat if repeat is not None else (3 if generative else 10),
                  warmup=warmup if warmup is not None else (1 if generative else 2))
    result = run_bench(list(bundles), sweep, tuple(dict.fromkeys(baselines)), source, probe=not no_probe,
                       log=lambda msg: click.echo(msg, err=True), title=title)
    click.echo(schema.write(result, fmt), nl=fmt == "md")
    if json_out:
        Path(json_out).write_text(schema.to_json(result) + "\n")
        click.echo(f"wrote {json_out}", err=True)


@main.command()
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--metric", "metrics", multiple=True, help="Compare only this metric (repeatable), e.g. latency_ms.")
@click.option("--format", "fmt", type=click.Choice(["md", "json"]), default="md", show_default=True)
@_friendly
def compare(a, b, metrics, fmt):
    """Compare benchmark result B against A: flags metrics that moved beyond the runs' own spread.

    Exit code 1 when any metric regressed, 0 otherwise (2: a file could not be read or compared)."""
    from medc.benchmarks import schema
    from medc.benchmarks.compare import compare as run_compare

    cmp = run_compare(schema.load(a), schema.load(b), metrics=list(metrics) or None, labels=(str(a), str(b)))
    if fmt == "json":
        click.echo(json.dumps(cmp.to_dict(), indent=1))
        click.echo(cmp.summary(), err=True)  # stdout stays one JSON document
    else:
        click.echo(cmp.to_markdown(), nl=False)
    if cmp.regressed:  # 1, not MedcError's 2: "it got slower" is a finding, not bad input
        sys.exit(1)


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="The HTML file to write.")
@click.option("--title", default=None, help="Page title  [default: the first result's title].")
@_friendly
def report(results, out, title):
    """One self-contained HTML report (tables and plots) from `medc bench` result files (JSON)."""
    import os
    import tempfile

    from medc.benchmarks import report as html_report
    from medc.benchmarks.schema import load

    page = html_report.render([load(p) for p in results], title=title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # temp file + rename: a reader (a browser reloading, a CI upload) never sees half a page
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a report is for sharing
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    click.echo(f"wrote {out} ({page.count(html_report.FIGURE_TAG)} figures)")


@main.command(name="eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--perplexity", "text_file", type=click.Path(path_type=Path), default=None,
              help="Text file to score (default: a real English text found on this machine, e.g. GPL-3).")
@click.option("--window", default=512, show_default=True, help="Tokens per window, [BOS] included.")
@click.option("--max-windows", default=None, type=int, help="Score at most N windows.")
@click.option("--reference", is_flag=True, help="Also score the source checkpoint with HF PyTorch fp32 (medc[build]).")
@click.option("--source", type=click.Path(path_type=Path, exists=True),
              help="With --reference: the checkpoint folder or GGUF file the bundle was built from (checked by "
                   "digest; default: the registry's weights folder).")
@click.option("--retrieval", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="MedSigLIP: similar-case retrieval on a labelled folder (one sub-folder per label) instead.")
@click.option("--dtype", type=click.Choice(["f16", "i8"]), default="f16", show_default=True,
              help="With --retrieval: the index's vector storage.")
@click.option("--json", "as_json", is_flag=True, help="With --retrieval: the figures as JSON.")
@click.option("--threads", type=int, default=None)
@_friendly
def eval_(bundle, text_file, window, max_windows, reference, source, retrieval, dtype, as_json, threads):
    """Perplexity of a MedGemma / Gemma 3 bundle on a text file (as llama-perplexity computes it), or with
    --retrieval DIR, a MedSigLIP bundle's retrieval: each image of DIR queries the others through the index a site
    would build; P@1/5/10 and the k nearest neighbours' majority-vote accuracy, and the index's recall@k against
    exact search."""
    from medc import runtime
    from medc.runtime import evaluate

    if retrieval is not None:
        from medc.runtime.retrieval import evaluate as evaluate_retrieval

        with runtime.load(bundle, threads=threads) as model:
            res = evaluate_retrieval(model, retrieval, dtype=dtype)
        if as_json:
            click.echo(json.dumps(dataclasses.asdict(res), indent=2))
            return
        click.echo(f"{retrieval}: {res.items} images, {len(res.labels)} labels "
                   f"({', '.join(f'{k} {v}' for k, v in res.labels.items())}); index {res.dtype}")
        click.echo("k      P@k    majority@k   index recall@k")
        for k in res.precision:
            click.echo(f"{k:<5d} {res.precision[k]:6.3f}   {res.majority[k]:8.3f}   {res.recall[k]:10.3f}")
        for name, why in res.failed:
            click.echo(f"skipped {name}: {why}", err=True)
        return

    text_file = text_file or evaluate.default_text()
    try:
        text = Path(text_file).read_text(errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise MedcError(f"cannot read {text_file} as UTF-8 text ({type(e).__name__}).") from None
    with runtime.load(bundle, threads=threads) as model:
        if not hasattr(model, "generate"):
            raise MedcError("perplexity needs a generative (MedGemma / Gemma 3) bundle.")
        wins = evaluate.windows(model.assets.tokenizer, model.assets.special_ids["bos"], text, window, max_windows)
        ours = evaluate.perplexity(evaluate.bundle_logits_fn(model), wins)
        record = model.bundle.manifest.model["source"]
    click.echo(f"{Path(text_file).name}: {ours['windows']} windows x {window} tokens")
    click.echo(f"bundle     perplexity {ours['perplexity']:.4f}")
    if reference:
        from medc.compile.gates import hf_logits_fn
        from medc.compile.loader import reference_model

        ref = evaluate.perplexity(hf_logits_fn(reference_model(record, source)), wins)
        click.echo(f"reference  perplexity {ref['perplexity']:.4f}  (HF PyTorch fp32)")
        click.echo(f"difference {ours['perplexity'] / ref['perplexity'] - 1:+.3%}")


@main.command()
@click.argument("bundles", nargs=-1, required=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless you mean it).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key-file", type=click.Path(path_type=Path, dir_okay=False),
              help="File holding the API key: every route but /health then needs Authorization: Bearer KEY.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=1),
              help="Requests waiting per chat model and per encoder; beyond it, 429 with Retry-After.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(min=1),
              help="Embedding / zero-shot items run together in one encoder call.")
@click.option("--max-concurrency", default=8, show_default=True, type=click.IntRange(min=1),
              help="Chat requests decoding together per model (continuous batching).")
@click.option("--max-image-mb", default=16.0, show_default=True, type=click.FloatRange(min=0.01))
@click.option("--max-images", default=8, show_default=True, type=click.IntRange(min=1), help="Images per request.")
@click.option("--max-body-mb", default=32.0, show_default=True, type=click.FloatRange(min=0.01))
@click.option("--max-tokens-cap", default=4096, show_default=True, type=click.IntRange(min=1),
              help="New tokens one chat request may ask for (max_tokens above it: 400).")
@click.option("--request-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a chat request may take, queue included; then it ends with what it has (finish_reason "
                   "length).")
@click.option("--max-connections", default=256, show_default=True, type=click.IntRange(min=1),
              help="Open connections; at the cap a new one closes the longest-idle one.")
@click.option("--header-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds from connecting (or a kept-alive request's first byte) to its complete headers.")
@click.option("--body-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds from a request's headers to its whole body (else 408).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A name clients (or a reverse proxy) call this server by; the Host header must be one (repeatable). "
                   "Default on loopback: localhost, 127.0.0.1, [::1]; elsewhere: not checked.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads per session.")
@click.option("--allow-degraded", is_flag=True, help="Serve bundles whose fidelity gate failed.")
@click.option("--dicom-store", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder where POST /dicomweb/studies (STOW-RS) stores instances and the SRs it writes; without "
                   "it that route answers 501.")
@click.option("--max-stow-instances", default=64, show_default=True, type=click.IntRange(min=1),
              help="application/dicom parts per STOW-RS request.")
@click.option("--dicom-config", "serve_dicom_config", type=click.Path(path_type=Path), default=None,
              help="TOML file of per-modality DICOM recipes for DICOM images (README, DICOM).")
@click.option("--index", "index", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Embedding index (`medc index create`) of the MedSigLIP bundle served: POST /v1/search and "
                   "/v1/index; without it they answer 501.")
@click.option("--index-salt-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The site's salt for Patient ID hashes, needed to add DICOM that names a patient "
                   "(default: MEDC_INDEX_SALT_FILE).")
@_trust_option
@_friendly
def serve(bundles, trust, host, port, api_key_file, max_queue, max_batch, max_concurrency, max_image_mb, max_images,
          max_body_mb, max_tokens_cap, request_timeout, max_connections, header_timeout, body_timeout, allowed_hosts,
          threads, allow_degraded, dicom_store, max_stow_instances, serve_dicom_config=None, index=None,
          index_salt_file=None):
    """Serve BUNDLES over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/embeddings, /v1/classify (and
    with --index, similar-case search: /v1/search, /v1/index).

    A bundle is PATH or ID=PATH (the model id clients send; default: the model name in its manifest)."""
    try:
        from medc.runtime.serve import ServeConfig, allowed_hosts as hosts_checked, serve as run_server
    except ImportError as e:
        raise MedcError(f"medc serve needs the serve extra ({e.name} is missing): pip install 'medc[serve]'.") from None
    api_key = None
    if api_key_file:
        try:
            api_key = Path(api_key_file).read_text().strip()
        except OSError as e:
            raise MedcError(f"cannot read --api-key-file {api_key_file} ({type(e).__name__}).") from None
        if len(api_key) < 16:
            raise MedcError(f"the API key in {api_key_file} is shorter than 16 characters; use a long random key.")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logging.getLogger("medc.serve").warning("binding %s without --api-key-file: anyone who can reach it can use it.",
                                                host)
    cfg = ServeConfig(host=host, port=port, api_key=api_key, max_queue=max_queue, max_batch=max_batch,
                      max_concurrency=max_concurrency, max_image_mb=max_image_mb, max_images=max_images,
                      max_body_mb=max_body_mb, threads=threads, allow_degraded=allow_degraded, trust=_trust(trust),
                      max_tokens_cap=max_tokens_cap, request_timeout=request_timeout, max_connections=max_connections,
                      header_timeout=header_timeout, body_timeout=body_timeout, allowed_hosts=allowed_hosts or None,
                      dicom_store=str(dicom_store) if dicom_store else None, max_stow_instances=max_stow_instances,
                      index=str(index) if index else None,
                      index_salt_file=str(index_salt_file) if index_salt_file else None)
    if serve_dicom_config:  # read now: a bad file fails at startup, not on the first DICOM request
        import dataclasses

        from medc.runtime.dicom import load_config

        cfg = dataclasses.replace(cfg, dicom=load_config(serve_dicom_config))
    if hosts_checked(cfg) is None:
        logging.getLogger("medc.serve").warning(
            "binding %s without --allowed-host: the Host header is not checked, so a web page can reach this server "
            "through DNS rebinding where a browser can reach it; pass --allowed-host with the names clients use.", host)
    import signal

    def _stop(signum, frame):  # uvicorn drains first, then re-raises the signal it caught: end as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        run_server(list(bundles), cfg, on_ready=lambda models: click.echo(
            f"serving {', '.join(m.id for m in models)} on http://{host}:{port} (Ctrl-C stops after in-flight "
            "requests)", err=True))
    except KeyboardInterrupt:
        click.echo("stopped: in-flight requests finished.", err=True)


@main.command()
def models():
    """List registered models."""
    from medc.compile.registry import MODELS

    for name, spec in MODELS.items():
        click.echo(f"{name:<18} {spec.family.hf_class:<20} {spec.description}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Every profile field as JSON.")
def targets(as_json):
    """List deployment targets (profiles in targets/profiles, with their datasheet sources)."""
    from dataclasses import asdict

    from medc.targets import TARGETS

    if as_json:
        click.echo(json.dumps({n: asdict(t) for n, t in TARGETS.items()}, indent=2))
        return
    click.echo(f"{'target':<22} {'SM':<5} {'memory':>14} {'GB/s':>6}  {'precisions':<30} {'TensorRT':<10} default")
    for name, t in TARGETS.items():
        mem = f"{t.usable_memory_gib:g}/{t.memory_gib:g} GiB" if t.memory_gib else "host RAM"
        click.echo(f"{name:<22} {t.compute_capability or '-':<5} {mem:>14} {t.bandwidth_gbs or '-':>6}  "
                   f"{','.join(t.precisions):<30} {','.join(t.tensorrt) or '-':<10} {t.default_precision}")


@main.command()
@click.argument("model")
@click.option("--target", default="cpu", show_default=True, help="Deployment target (see `medc targets`).")
@click.option("--precision", default=None, help="A preset or per-component list, as for build (default: the target's).")
@click.option("--recipe", type=click.Path(path_type=Path), help="Recipe file, as for build.")
@click.option("--context", type=click.IntRange(min=16), default=None, help="Tokens of context (default 4096).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The plan and every preset's plan as JSON.")
@click.option("--probe", is_flag=True, help="CPU targets: measure this host's GEMM peaks (fp32, int8; bf16 with "
              "OpenVINO) and memory bandwidth, a few seconds, for the vision floor and the decode ceiling.")
@_friendly
def plan(model, target, precision, recipe, context, batch, as_json, probe):
    """Will MODEL fit TARGET? Weights, KV cache, activations vs usable memory; decode and vision floors.

    Exit status 0 when the chosen recipe fits, 1 when it does not."""
    from medc.compile import planner
    from medc.compile.plan import BuildOptions, make_plan, resolve
    from medc.targets import get_target

    t = get_target(target)
    opts = BuildOptions(model=model, out=Path("-"), precision=precision or t.default_precision, recipe=recipe,
                        target=target, context=context, max_batch=batch)
    resolved = resolve(model)
    host = None
    if probe:
        from medc.benchmarks.host import Probe
        from medc.benchmarks.roofline import Peaks

        if t.kind != "cpu":
            raise MedcError(f"--probe measures this host for CPU targets; {t.name}'s peaks come from its datasheet.")
        p = Probe()
        for _ in range(3):
            p.sample()
        peaks = Peaks.from_probe(p.metrics())
        host = planner.with_host_peaks(t, peaks.flops, peaks.bytes_per_s)
    chosen = planner.plan_build(make_plan(opts, resolved), target=host)
    best, plans = planner.recommend(resolved, opts, target=host)
    if host is not None:
        chosen.notes.append("floors from this host's probe: " + ", ".join(
            f"{k} {v * 1e3:.0f} G{'OP' if k == 'int8' else 'FLOP'}/s" for k, v in host.peak_tflops.items())
            + f", memory {host.bandwidth_gbs:.1f} GB/s")
    if as_json:
        click.echo(json.dumps({"plan": chosen.to_json(), "presets": {planner.preset_of(p): p.to_json() for p in plans},
                               "recommended": best and planner.preset_of(best)}, indent=2))
    else:
        click.echo(chosen.render())
        click.echo(f"\n  {'preset':<7} {'weights':>9} {'KV':>9} {'total':>9}  fits  {'decode tok/s':>12} {'vision ms':>9}")
        for p in plans:
            g = lambda b: f"{b / planner.GIB:7.2f}G"  # noqa: E731
            click.echo(f"  {planner.preset_of(p):<7} {g(p.weight_bytes):>9} {g(p.kv_bytes):>9} {g(p.total_bytes):>9}  "
                       f"{'yes ' if p.fits else 'no  '}  {p.decode_tokens_per_s or 0:12.1f} {p.vision_ms or 0:9.1f}")
        if best:
            click.echo(f"  recommended: --precision {planner.preset_of(best)} (the fastest preset that fits)")
        else:
            smaller = [(n, planner.largest_context(resolved, opts, n, batch)) for n in ("int4", "int8")
                       if n in t.precisions]
            hint = "; ".join(f"{n} fits at --context {c}" for n, c in smaller if c)
            click.echo("  no preset fits " + t.name + (f" at context {chosen.context}: {hint}" if hint else ""))
    sys.exit(0 if chosen.fits else 1)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", required=True, help="The TensorRT target to check against (see `medc targets`).")
@click.option("--json", "as_json", is_flag=True, help="The findings as JSON.")
@_friendly
def lint(bundle, target, as_json):
    """Will TensorRT's ONNX parser take BUNDLE's graphs for TARGET? Checks, on this CPU, every graph against the
    operators and data types the parser of each of the target's TensorRT versions supports, the explicit
    quantization rules (symmetric int8, int4 weight-only blocks), opsets and optimisation profiles.

    Exit status 0 when TRT-ready (warnings allowed), 1 when not."""
    from medc.compile.lint import lint_bundle

    report = lint_bundle(bundle, target)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.render())
    if report.ok:
        if not as_json:
            click.echo(f"TRT-ready for {target}: {len(report.warnings)} warning(s).")
        sys.exit(0)
    click.echo(f"not TRT-ready: rebuild with --target {target}", err=as_json)
    sys.exit(1)


@main.group(name="index")
def index_() -> None:
    """An embedding index of a site's images and DICOM (similar-case search; needs medc[retrieval])."""


def _index_bundle(index, bundle, threads=None):
    """The index's bundle: --bundle, else where it was when the index was made (checked by digest either way)."""
    from medc import runtime

    path = bundle or index.bundle.get("path")
    if not path or not Path(path).is_dir():
        raise MedcError(f"the bundle that made {index.path} is not at {path}; give it with --bundle BUNDLE.")
    model = runtime.load(path, threads=threads)
    from medc.runtime.retrieval import bundle_record

    index.check_bundle(bundle_record(model))
    return model


@index_.command(name="create")
@click.argument("index", type=click.Path(path_type=Path))
@click.option("--bundle", required=True, type=click.Path(path_type=Path, exists=True),
              help="The MedSigLIP bundle whose embeddings the index holds.")
@click.option("--dtype", type=click.Choice(["f16", "i8"]), default="f16", show_default=True,
              help="How the vectors are stored (i8: half the memory, a little recall).")
@_friendly
def index_create(index, bundle, dtype):
    """Create an empty index at INDEX for BUNDLE's embeddings."""
    from medc import runtime
    from medc.runtime.retrieval import bundle_record, embedding_dim
    from medc.runtime.vectorindex import VectorIndex

    with runtime.load(bundle) as model:
        record, dim = bundle_record(model), embedding_dim(model)
    with VectorIndex.create(index, dim, record, dtype):
        pass
    click.echo(f"created {index}: {dim}-d {dtype} vectors of {record['name']} (manifest sha256 {record['sha256'][:16]}…)")


@index_.command(name="salt")
@click.argument("file", type=click.Path(path_type=Path))
@_friendly
def index_salt(file):
    """Write a new random salt to FILE (owner-only). Keep it outside the index, and back it up: without it a
    patient's data in the index cannot be found for deletion."""
    import os
    import secrets

    if file.exists():
        raise MedcError(f"{file} exists; a salt is never overwritten (the index's patient hashes depend on it).")
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    click.echo(f"wrote {file}")


@index_.command(name="add")
@click.argument("index", type=click.Path(path_type=Path))
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--bundle", type=click.Path(path_type=Path, exists=True), default=None,
              help="The index's bundle (default: where it was when the index was made).")
@click.option("--salt-file", type=click.Path(path_type=Path), default=None,
              help="The site's salt for Patient ID hashes (default: MEDC_INDEX_SALT_FILE).")
@click.option("--labels-from-folders", is_flag=True, help="Label each file by its first sub-folder under a PATH.")
@click.option("--batch", default=16, show_default=True, type=click.IntRange(1, 256))
@click.option("--threads", type=int, default=None)
@_friendly
def index_add(index, paths, bundle, salt_file, labels_from_folders, batch, threads):
    """Embed and add images (PNG, JPEG), DICOM files and folders of them. Resumable: rerun after an interruption
    and it continues where it stopped, adding nothing twice (keyed by SOP Instance UID or file sha256)."""
    from medc.runtime.retrieval import add_paths
    from medc.runtime.vectorindex import VectorIndex, read_salt

    salt = read_salt(salt_file)
    with VectorIndex.open(index) as idx, _index_bundle(idx, bundle, threads) as model:
        report = add_paths(idx, model, list(paths), salt, labels_from_folders, batch)
        total = len(idx)
    for name, why in report.failed:
        click.echo(f"skipped {name}: {why}", err=True)
    click.echo(f"added {report.added}, already indexed {report.known}, failed {len(report.failed)}; "
               f"{total} in {index}")
    if report.failed:
        sys.exit(2)


@index_.command(name="info")
@click.argument("index", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@_friendly
def index_info(index, as_json):
    """What INDEX holds: items by modality, the bundle that made it, its size."""
    from medc.runtime.vectorindex import VectorIndex

    with VectorIndex.open(index, readonly=True) as idx:
        info = idx.info()
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(info), indent=2))
        return
    click.echo(f"{info.path}: {info.count} items, {info.dim}-d {info.dtype}, {info.bytes_on_disk / 2**20:.1f} MiB")
    click.echo(f"bundle {info.bundle.get('name')} (manifest sha256 {info.bundle.get('sha256', '')[:16]}…)")
    for modality, n in info.modalities.items():
        click.echo(f"  {modality}: {n}")


@index_.command(name="remove")
@click.argument("index", type=click.Path(path_type=Path))
@click.option("--study", "studies", multiple=True, help="Study Instance UID (repeatable).")
@click.option("--patient-id", default=None, help="Every item of this patient (by the salted hash of the ID).")
@click.option("--salt-file", type=click.Path(path_type=Path), default=None,
              help="With --patient-id: the site's salt (default: MEDC_INDEX_SALT_FILE).")
@_friendly
def index_remove(index, studies, patient_id, salt_file):
    """Delete studies or a patient's data for real: rows deleted and the database vacuumed, vectors removed and
    the graph rebuilt, so nothing stays in free pages, the WAL or tombstones."""
    from medc.runtime.vectorindex import VectorIndex, patient_hash, read_salt

    if not studies and patient_id is None:
        raise MedcError("give --study UID (repeatable) or --patient-id ID.")
    with VectorIndex.open(index) as idx:
        who = None
        if patient_id is not None:
            salt = read_salt(salt_file)
            if salt is None:
                raise MedcError("--patient-id needs the site's salt: --salt-file FILE or MEDC_INDEX_SALT_FILE.")
            idx.check_salt(salt)
            who = patient_hash(salt, patient_id)
        n = idx.remove(list(studies), who)
        left = len(idx)
    click.echo(f"removed {n} items; {left} left in {index}")


@main.command()
@click.argument("index", type=click.Path(path_type=Path))
@click.option("--image", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None)
@click.option("--text", default=None)
@click.option("--like", "like", default=None, help="The SOP Instance UID (or key) of an indexed item.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--where", "where", multiple=True, help="NAME=VALUE filter (repeatable): modality, body_part, "
                                                       "study_date, label, study_uid, series_uid.")
@click.option("--bundle", type=click.Path(path_type=Path, exists=True), default=None,
              help="The index's bundle (default: where it was when the index was made).")
@click.option("--json", "as_json", is_flag=True)
@_friendly
def search(index, image, text, like, k, where, bundle, as_json):
    """The k items of INDEX most like an image, a text ("tension pneumothorax") or an indexed instance."""
    from medc.runtime.retrieval import parse_filters, query_vector
    from medc.runtime.vectorindex import VectorIndex

    filters = parse_filters(list(where))
    with VectorIndex.open(index, readonly=True) as idx:  # beside a listener or a server that writes it
        if like is not None and image is None and text is None:
            vec, exclude = query_vector(idx, sop_uid=like)
        else:
            with _index_bundle(idx, bundle) as model:
                vec, exclude = query_vector(idx, model, image=image, text=text, sop_uid=like)
        hits = idx.search(vec, k, filters, exclude=exclude)
    if as_json:
        click.echo(json.dumps({"results": [h.to_json() for h in hits]}, indent=2))
        return
    for rank, h in enumerate(hits, 1):
        d = h.to_json()
        where_ = d.get("sop_uid") or d.get("path")
        extra = ", ".join(f"{key}={d[key]}" for key in ("modality", "body_part", "study_date") if key in d)
        labels = f" [{', '.join(d['labels'])}]" if d["labels"] else ""
        click.echo(f"{rank:3d}  {h.score:.4f}  {where_}{labels}" + (f"  ({extra})" if extra else ""))


@main.group()
def adapter() -> None:
    """Run-time LoRA adapters of a bundle (one base, many site adapters)."""


@adapter.command(name="add")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("adapter_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--name", default=None, help="What requests call it (default: the adapter folder's name).")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiplies the adapter's alpha / r.")
@click.option("--sign-key", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Sign the adapter's record (the base manifest and its signature are not touched).")
@_trust_option
@_friendly
def adapter_add(bundle, adapter_dir, name, scale, sign_key, trust):
    """Add a PEFT LoRA adapter to a bundle built with --adapter-slot, without rebuilding the base: converted to
    ONNX Runtime's adapter format for the bundle's slots, and recorded (records/adapter-NAME.json) with its hash."""
    from medc.compile.adapters import add_to_bundle
    from medc.signing import load_private

    key = load_private(sign_key) if sign_key else None
    record = add_to_bundle(bundle, adapter_dir, name, scale, key, _trust(trust))
    click.echo(f"added {record['file']} (rank {record['rank']}, {len(record['target_modules'])} target modules); "
               f"use it with `medc run {bundle} --adapter {Path(record['file']).name.split('.onnx_adapter')[0]}`")


@main.group()
def export() -> None:
    """Hand bundles to other serving engines: a Triton model repository, Kubernetes manifests."""


@export.command(name="triton")
@click.argument("bundles", nargs=-1, required=True)
@click.option("-o", "--out", type=click.Path(path_type=Path), help="The model repository to write.")
@click.option("--check", "check", is_flag=True,
              help="Check the model repository given as the argument instead: every config.pbtxt against Triton's "
                   "schema, the ONNX graphs, engines and bundles it names.")
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default=None,
              help="Instance kind (KIND_GPU/KIND_CPU). Default: the bundle's target's.")
@click.option("--instances", default=1, show_default=True, help="Instances per model.")
@click.option("--max-batch", default=16, show_default=True, help="max_batch_size of the encoder models.")
@click.option("--dynamic-batching/--no-dynamic-batching", default=True, show_default=True)
@click.option("--queue-delay-us", default=100, show_default=True,
              help="How long Triton's dynamic batcher may hold a request for a fuller batch.")
@click.option("--release", default=None, help="The Triton container release to write for (default: the newest medc "
                                              "knows); its ONNX Runtime must run the graphs.")
@click.option("--execution-env", default=None,
              help="EXECUTION_ENV_PATH of the Python-backend models: a conda-pack'ed .tar.gz or a folder with "
                   "bin/activate, holding medc (default: Triton's own Python, with medc installed by the Dockerfile).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@_friendly
def export_triton(bundles, out, check, kind, instances, max_batch, dynamic_batching, queue_delay_us, release,
                  execution_env, force):
    """Write BUNDLES (PATH or ID=PATH) as a Triton Inference Server model repository: one model per encoder
    component (onnxruntime_onnx, or tensorrt_plan where engines are built) and one Python-backend model per bundle
    running medc's runtime (MedSigLIP: image bytes and texts in, embeddings and zero-shot scores out; MedGemma:
    streamed text). `--check REPO` validates a repository instead."""
    from medc.compile.triton import DEFAULT_RELEASE, TritonOptions, check_repository, export_repository

    if check:
        if len(bundles) != 1:
            raise MedcError("--check takes one model repository: medc export triton --check REPO")
        problems = check_repository(Path(bundles[0]))
        for p in problems:
            click.echo(f"error: {p}", err=True)
        if problems:
            sys.exit(1)
        click.echo(f"{bundles[0]}: every model checks against Triton's schema and its files.")
        return
    if out is None:
        raise MedcError("give the repository to write: -o REPO (or --check REPO to check one).")
    opts = TritonOptions(kind=kind, instances=instances, max_batch=max_batch, dynamic_batching=dynamic_batching,
                         queue_delay_us=queue_delay_us, release=release or DEFAULT_RELEASE,
                         execution_env=execution_env)
    models = export_repository(list(bundles), out, opts, force=force)
    for m in models:
        click.echo(f"{m.name}: {m.platform}" + (f" (ONNX Runtime >= {m.min_ort})" if m.min_ort else ""))
    click.echo(f"wrote {out}: {len(models)} models; see {out}/README.md")


@export.command(name="k8s")
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Folder for the manifests.")
@click.option("--namespace", default="default", show_default=True)
@click.option("--image", default=None, help="Container image (default: medc-serve:VERSION or the repository's).")
@click.option("--pvc", default=None, help="PersistentVolumeClaim holding the bundle or repository.")
@click.option("--storage-uri", default=None, help="KServe storageUri (pvc://... or oci://...) instead of --pvc.")
@click.option("--gpus", type=int, default=None, help="nvidia.com/gpu per pod (default: 1 for GPU targets, else 0).")
@_friendly
def export_k8s(source, out, namespace, image, pvc, storage_uri, gpus):
    """Kubernetes manifests for SOURCE: a bundle gives a KServe ServingRuntime and InferenceService running
    `medc serve`; a repository from `medc export triton` gives a Triton Deployment and Service."""
    from medc.compile.k8s import write_manifests

    written = write_manifests(source, out, namespace=namespace, image=image, pvc=pvc, storage_uri=storage_uri,
                              gpus=gpus)
    for p in written:
        click.echo(str(p))
    click.echo(f"apply with: kubectl apply -f {out}")


@main.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), help="Spool and results folder.")
@click.option("--ae-title", default="MEDC", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (default: loopback only).")
@click.option("--port", default=11112, show_default=True, type=click.IntRange(0, 65535))
@click.option("--labels", default="normal,abnormal", show_default=True, help="MedSigLIP: comma-separated labels.")
@click.option("--prompt", default="Describe the findings.", show_default=True, help="MedGemma: the question.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--allow-aet", default=None, help="Comma-separated calling AE titles to accept (others are rejected).")
@click.option("--forward", default=None, metavar="HOST:PORT:AET", help="C-STORE each SR to this PACS.")
@click.option("--forward-untrusted", is_flag=True, help="Forward SRs from random-weight or degraded bundles too.")
@click.option("--tls-cert", type=click.Path(path_type=Path, exists=True), default=None)
@click.option("--tls-key", type=click.Path(path_type=Path, exists=True), default=None)
@click.option("--tls-ca", type=click.Path(path_type=Path, exists=True), default=None,
              help="Require client certificates signed by this CA.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--series-quiet", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds without a new instance after which a series is complete (MedGemma: the volume prompt; "
                   "MedSigLIP: the series aggregate).")
@click.option("--secondary-capture", is_flag=True,
              help="Also write (and forward) each result rendered as a Secondary Capture image, for PACS without SR "
                   "display.")
@click.option("--sr-class", type=click.Choice(["comprehensive3d", "comprehensive"]), default="comprehensive3d",
              show_default=True)
@click.option("--keep-days", type=click.FloatRange(min=0), default=None,
              help="Delete received instances this many days after their result (and forward) is done.")
@click.option("--dicom-config", type=click.Path(path_type=Path, exists=True), default=None,
              help="Windowing and frame settings for DICOM ingest (medc.runtime.dicom).")
@click.option("--retry-failed", is_flag=True, help="Queue the instances whose inference failed again, then listen.")
@click.option("--status", "status_dir", type=click.Path(path_type=Path), default=None,
              help="Print the counters of the listener writing to this --out folder and exit.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads per session.")
@click.option("--inline-workers", is_flag=True, hidden=True,
              help="Infer in threads of the SCP's own process (slower C-STORE acks; for comparison).")
@click.option("--index", "index", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="MedSigLIP: add every instance to this embedding index (`medc index create`) after inference, "
                   "keyed by SOP Instance UID.")
@click.option("--index-salt-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="With --index: the site's salt for Patient ID hashes, needed for instances that name a patient "
                   "(default: MEDC_INDEX_SALT_FILE).")
@_trust_option
@_friendly
def listen(bundle, out, ae_title, host, port, labels, prompt, max_new_tokens, allow_aet, forward, forward_untrusted,
           tls_cert, tls_key, tls_ca, workers, series_quiet, secondary_capture, sr_class, keep_days, dicom_config,
           retry_failed, status_dir, threads, inline_workers, trust, index=None, index_salt_file=None):
    """A DICOM node: receive images by C-STORE (and answer C-ECHO), run BUNDLE on each, write a JSON result and a
    DICOM Structured Report per instance under --out, and optionally forward the SRs to a PACS."""
    try:
        from medc.runtime.listen import ListenConfig, Listener, parse_forward, read_status
    except ImportError as e:
        raise MedcError(f"medc listen needs the dicom extra ({e.name} is missing): pip install 'medc[dicom]'.") from None
    if status_dir is not None:
        click.echo(json.dumps(read_status(status_dir), indent=1))
        return
    if bundle is None or out is None:
        raise MedcError("medc listen needs a BUNDLE and --out DIR (or --status DIR).")
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None  # noqa: E731
    cfg = ListenConfig(out=out, ae_title=ae_title, host=host, port=port, labels=split(labels) or ["normal", "abnormal"],
                       prompt=prompt, max_new_tokens=max_new_tokens, allow_aet=split(allow_aet),
                       forward=parse_forward(forward) if forward else None, forward_untrusted=forward_untrusted,
                       tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, workers=workers, quiet_s=series_quiet,
                       secondary_capture=secondary_capture, sr_class=sr_class, keep_days=keep_days,
                       dicom_config=dicom_config, threads=threads,
                       trust=_trust(trust), trust_paths=[str(t) for t in trust] or None,
                       worker_process=not inline_workers, index=index, index_salt_file=index_salt_file)
    log = logging.getLogger("medc.listen")
    if host not in ("127.0.0.1", "localhost", "::1") and not cfg.allow_aet:
        log.warning("binding %s without --allow-aet: any calling AE title that reaches it is accepted.", host)
    node = Listener(bundle, cfg)
    if retry_failed:
        click.echo(f"queued {node.retry_failed()} failed instance(s) again", err=True)
    import signal

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    node.start()
    click.echo(f"listening as {ae_title} on {host}:{node._server.server_address[1]} (Ctrl-C stops)", err=True)
    try:
        node.serve_forever()
    except KeyboardInterrupt:
        node.stop()
        click.echo("stopped: what was received and not yet inferred stays queued under --out.", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
