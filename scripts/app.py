"""Gradio demo (also a Hugging Face Space): watch a diffusion LM denoise, with and without FreeCache
and guided unmasking; and see which screenshot tokens GUI-KV / PrefixKV keep in a GUI agent's cache.

    python scripts/app.py                                # bundled tiny models, offline, CPU
    python scripts/app.py --model PATH_OR_ID --guide PATH_OR_ID --vlm Qwen/Qwen2.5-VL-3B-Instruct --device cuda

Text tab: the same prompt is decoded three times: no cache, FreeCache, and FreeCache with the AR
guide. Each panel shows the canvas live: masked positions as grey blocks, committed tokens coloured by
the step that committed them (blue early, red late). Then tokens/s, DLM forwards and the speedup.

VLM tab: a sequence of screenshots (uploaded, or synthetic ones drawn here) goes through a
`vlm.GUIAgentSession` turn by turn with the chosen compression; each screenshot is drawn with the
patches the cache dropped darkened (brightness = fraction of layers and KV heads that kept the
patch), with KV bytes against the full cache. By default the VLM is a tiny *random* Qwen2-VL (no VLM
weights ship offline), so the maps show the method's mechanics, not a trained model's choices.
"""

from __future__ import annotations

import argparse
import html
import os
import queue
import sys
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
try:
    import dlmcache.kernels  # noqa: F401  (installed: the repository's kernels/ and vlm/ become dlmcache.*)
except ImportError:
    sys.exit("dlmcache is not installed: run `pip install .` in the repository (a Space lists `.` in requirements.txt)")

import gradio as gr
import torch
from dlmcache.vlm import GUIAgentSession
from dlmcache.vlm.methods import METHODS, session_compression
from dlmcache.vlm.synthetic import instruction, screenshot
from PIL import Image

from dlmcache import DLMPipeline
from dlmcache.run_config import RunConfig
from dlmcache.settings import DecodeSettings

MAX_PROMPT_CHARS = 2000
MAX_SCREENSHOTS = 8
MAX_IMAGE_PIXELS = 1280 * 1280
MAX_NEW_TOKENS = 512
FRAME_SECONDS = 0.05  # at most ~20 UI updates per second per panel
EXAMPLES = ["Compute 45+38-27.", "Compute 72-35+18.", "Compute 19+26+33."]
CSS = """
.canvas { font-family: ui-monospace, monospace; line-height: 1.9; word-break: break-word; }
.canvas .m { background: #d0d0d0; color: #d0d0d0; border-radius: 3px; padding: 0 2px; margin: 0 1px; }
.canvas .t { border-radius: 3px; padding: 0 1px; color: #fff; }
.canvas .eos { color: #aaa; font-size: 0.7em; }
"""


class Demo:
    """The pipeline and the three decoding modes; one generation at a time (the queue serialises)."""

    def __init__(self, model: str, guide: str | None, device: str, dtype: torch.dtype):
        self.pipe = DLMPipeline.from_pretrained(model, torch_dtype=dtype, device=device)
        self.pipe.set_progress_bar_config(disable=True)
        self.guide = guide
        self.lock = threading.Lock()

    def modes(self, threshold: float, edit_threshold: float = 0.0) -> list[tuple[str, str]]:
        """(label, run_config) of each panel; the threshold (and, for a block diffusion model, LLaDA2.1's
        token editing at `edit_threshold`, 0: off) applies to the unguided modes."""
        th = f"+threshold={threshold}" if threshold > 0 else ""
        th += f"+edit_threshold={edit_threshold}" if edit_threshold > 0 else ""
        modes = [("none", f"none{th}"), ("freecache", f"freecache{th}")]
        if self.guide and not self.pipe.model.block_diffusion:  # guided unmasking: full-attention models
            modes.append(("freecache + guide", f"freecache+guide={self.guide}"))
        return modes

    def check(self, prompt: str, max_new_tokens: int, block_length: int, steps: int, threshold: float,
              edit_threshold: float = 0.0) -> None:  # fmt: skip
        """Raise a `gr.Error` (shown in the page) for a request the pipeline would refuse or that is too big."""
        if not prompt or not prompt.strip():
            raise gr.Error("The prompt is empty.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise gr.Error(f"The prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}.")
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise gr.Error(f"max_new_tokens={max_new_tokens} must be in 1..{MAX_NEW_TOKENS}.")
        if not 0 <= threshold < 1:
            raise gr.Error(f"threshold={threshold} must be in [0, 1) (0 turns it off).")
        if not 0 <= edit_threshold < 1:
            raise gr.Error(f"edit_threshold={edit_threshold} must be in [0, 1) (0 turns token editing off).")
        if edit_threshold > 0 and not self.pipe.model.block_diffusion:
            raise gr.Error("Token editing (LLaDA2.1's rule) is for block diffusion models; this one is full attention.")
        try:
            DecodeSettings.resolve(self.pipe.model, self.pipe.scheduler, self.pipe.cache, max_new_tokens, block_length,
                                   steps)  # fmt: skip
        except ValueError as e:
            raise gr.Error(str(e)) from None

    def decode_live(self, label: str, prompt: str, config: str, max_new_tokens: int, block_length: int, steps: int):
        """Yield (html, None) frames while the pipeline runs in a worker thread, then (html, output).
        Closing the generator (Gradio cancels a run, a client leaves) stops the decoding at the next
        denoising step and waits for the worker."""
        RunConfig.parse(config).apply(self.pipe)
        frames: queue.Queue = queue.Queue()
        result = {}
        cancelled = threading.Event()

        def on_step(pipe, step, state):
            if cancelled.is_set():
                raise Cancelled
            frames.put((step, state["sequences"][0].tolist(), state["commit_step"][0].tolist()))

        def work():
            try:
                result["out"] = self.pipe(
                    [[{"role": "user", "content": prompt}]],
                    max_new_tokens=max_new_tokens,
                    block_length=block_length,
                    steps=steps,
                    callback_on_step_end=on_step,
                )
            except Cancelled:
                pass
            except Exception as e:  # reported in the page by the caller
                result["error"] = e
            frames.put(None)

        self.worker = threading.Thread(target=work, daemon=True)
        self.worker.start()
        last, latest = 0.0, None
        try:
            while (item := frames.get()) is not None:
                latest = item
                if time.perf_counter() - last >= FRAME_SECONDS:
                    last = time.perf_counter()
                    yield self.render(label, *latest, steps), None
        finally:
            cancelled.set()
            self.worker.join()
        if "error" in result:
            raise gr.Error(f"{config}: {result['error']}")
        out = result["out"]
        yield self.render(label, out.nfe, out.sequences[0].tolist(), out.commit_step[0].tolist(), out.nfe), out

    def render(self, label: str, step: int, ids: list[int], commit: list[int], total: int) -> str:
        tok, mask, eos = self.pipe.tokenizer, self.pipe.mask_token_id, self.pipe.tokenizer.eos_token_id
        parts = []
        for t, c in zip(ids, commit, strict=True):
            if t == mask:
                parts.append('<span class="m">▒</span>')
            elif t == eos:
                parts.append('<span class="eos">·</span>')
            else:
                hue = int(240 * (1 - c / max(total - 1, 1)))  # blue = early, red = late
                text = html.escape(tok.decode([t])).replace(" ", "&nbsp;")
                parts.append(f'<span class="t" style="background:hsl({hue},70%,45%)" title="step {c}">{text}</span>')
        return f'<div class="canvas"><b>{html.escape(label)}</b> · step {step}<br>{"".join(parts)}</div>'

    def run(self, prompt: str, max_new_tokens: int, block_length: int, steps: int, threshold: float,
            edit_threshold: float = 0.0):  # fmt: skip
        """The Run button: the three panels update live one after another, then the stats table."""
        max_new_tokens, block_length, steps = int(max_new_tokens), int(block_length), int(steps or max_new_tokens)
        self.check(prompt, max_new_tokens, block_length, steps, threshold, edit_threshold)
        modes = self.modes(threshold, edit_threshold)
        canvases, texts, rows = ["", "", ""], ["", "", ""], []
        with self.lock:
            for i, (label, config) in enumerate(modes):
                for canvas, out in self.decode_live(label, prompt, config, max_new_tokens, block_length, steps):
                    canvases[i] = canvas
                    if out is not None:
                        texts[i] = out.texts[0]
                        rows.append((label, config, out))
                    yield *canvases, *texts, stats_table(rows)


class Cancelled(Exception):
    """Raised from the step callback to stop a decoding whose viewer went away."""


def stats_table(rows) -> str:
    if not rows:
        return ""
    base = rows[0][2].stats["answer_tokens_per_second"]  # 0 when `none` answered with EOS at once
    lines = [
        "| mode | config | answer tokens/s | DLM forwards | tokens / forward | speedup vs none |",
        "|---|---|---|---|---|---|",
    ]
    for label, config, out in rows:
        tps = out.stats["answer_tokens_per_second"]
        lines.append(
            f"| {label} | `{config}` | {tps:.1f} | {out.nfe} | {out.stats['answer_tokens'] / max(out.nfe, 1):.2f} | "
            f"{f'{tps / base:.2f}x' if base > 0 else '-'} |"
        )
    return "\n".join(lines)


class VLMDemo:
    """GUI-KV / PrefixKV / SnapKV / StreamingLLM on a screenshot sequence, shown as kept-token maps."""

    def __init__(self, vlm: str | None, device: str, dtype: torch.dtype):
        if vlm:
            from dlmcache.vlm.loading import load_vlm

            self.model, self.processor = load_vlm(vlm, dtype, device)
            self.name = vlm
        else:
            from dlmcache.vlm.tiny import tiny_processor, tiny_vlm

            self.processor = tiny_processor(max_pixels=448 * 448)
            self.model = tiny_vlm(self.processor, layers=4, hidden=128, dtype=dtype).to(device)
            self.name = "tiny random Qwen2-VL (4 layers, d 128)"
        self.lock = threading.Lock()

    def images(self, files, synthetic: int) -> list[Image.Image]:
        if files:
            if len(files) > MAX_SCREENSHOTS:
                raise gr.Error(f"{len(files)} screenshots uploaded; the limit is {MAX_SCREENSHOTS}.")
            shots = []
            for f in files:
                try:
                    im = Image.open(f if isinstance(f, str) else f.name).convert("RGB")
                except OSError as e:
                    raise gr.Error(f"not an image: {e}") from None
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    im.thumbnail((1280, 1280))
                shots.append(im)
            return shots
        return [screenshot(t, (448, 448)) for t in range(int(synthetic))]

    def compression(self, method: str, budget: float, shots):
        calibration = [
            [{"role": "user", "content": [{"type": "image", "image": shots[0]}, {"type": "text", "text": "Go."}]}]
        ]
        try:
            return session_compression(method, budget, self.model, self.processor, calibration)
        except ValueError as e:
            raise gr.Error(str(e)) from None

    def run(self, files, synthetic: int, method: str, budget: float, max_screenshots: int):
        if not 0 < budget <= 1:
            raise gr.Error(f"budget={budget} must be in (0, 1].")
        with self.lock:
            shots = self.images(files, synthetic)
            full = GUIAgentSession(self.model, self.processor, max_new_tokens=4, max_screenshots=int(max_screenshots))
            session = GUIAgentSession(
                self.model,
                self.processor,
                max_new_tokens=4,
                max_screenshots=int(max_screenshots),
                **self.compression(method, budget, shots),
            )
            for t, shot in enumerate(shots):
                full.step(shot, instruction(t))
                session.step(shot, instruction(t))
            first = len(shots) - min(len(shots), int(max_screenshots))
            maps = [
                (
                    overlay(shots[i], session.kept_map(i)),
                    f"screenshot {i + 1}: {float(session.kept_map(i).mean()):.0%} kept",
                )
                for i in range(first, len(shots))
            ]
        lines = [
            "| turn | tokens seen | kept (mean over layers) | KV bytes | full cache | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for t, (s, f) in enumerate(zip(session.stats, full.stats, strict=True)):
            lines.append(
                f"| {t + 1} | {s.seen_tokens} | {s.kept_tokens:.0f} | {s.kv_bytes / 1024:.1f} KiB | "
                f"{f.kv_bytes / 1024:.1f} KiB | {s.kv_bytes / f.kv_bytes:.2f}x |"
            )
        return maps, f"**{method} at {budget:.0%}** on {self.name}\n\n" + "\n".join(lines)


def overlay(image: Image.Image, kept: torch.Tensor) -> Image.Image:
    """`image` with each merged patch darkened by the fraction of the cache that dropped it."""
    rows, cols = kept.shape
    shade = Image.fromarray((180 * (1 - kept.clamp(0, 1))).to(torch.uint8).numpy(), mode="L")
    shade = shade.resize(image.size, Image.NEAREST)
    black = Image.new("RGB", image.size, (10, 10, 30))
    return Image.composite(black, image.convert("RGB"), shade)


def build(demo: Demo, vlm_demo: VLMDemo | None = None) -> gr.Blocks:
    with gr.Blocks(title="dlmcache: FreeCache and guided unmasking") as app:
        with gr.Tab("Diffusion LM"):
            text_tab(demo)
        if vlm_demo is not None:
            with gr.Tab("GUI agent KV"):
                vlm_tab(vlm_demo)
    return app


def vlm_tab(demo: VLMDemo) -> None:
    gr.Markdown(
        "A GUI agent sees a new screenshot every turn. **GUI-KV** keeps the visual tokens that are salient "
        "(hidden-state norm) and not redundant with the newest screenshot; **PrefixKV** gives each layer its "
        "own budget from a global search. Darkened patches were dropped from the KV cache. Model: "
        f"{demo.name}."
    )
    with gr.Row():
        files = gr.File(label="Screenshots (up to 8; none = synthetic)", file_count="multiple", file_types=["image"])
        with gr.Column():
            synthetic = gr.Slider(2, MAX_SCREENSHOTS, value=4, step=1, label="synthetic screenshots")
            method = gr.Dropdown(list(METHODS), value="GUI-KV", label="method")
            budget = gr.Slider(0.05, 1.0, value=0.2, step=0.05, label="budget (fraction kept)")
            max_shots = gr.Slider(1, MAX_SCREENSHOTS, value=MAX_SCREENSHOTS, step=1, label="max screenshots in context")
            go = gr.Button("Compress", variant="primary")
    gallery = gr.Gallery(label="kept tokens", columns=4, height="auto")
    table = gr.Markdown(elem_id="vlm-stats")
    go.click(demo.run, [files, synthetic, method, budget, max_shots], [gallery, table], concurrency_limit=1)


def text_tab(demo: Demo) -> None:
    gr.Markdown(
        "# dlmcache\nA diffusion LM fills a canvas of masks over several denoising steps. **FreeCache** "
        "reuses the K/V of the prompt and finished blocks instead of recomputing them every step; a "
        "small **autoregressive guide** verifies the drafts so many tokens commit per step. "
        "Grey blocks are still masked; colours give the step each token was committed at (blue early, red late)."
    )
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], max_length=MAX_PROMPT_CHARS, scale=4)
        run = gr.Button("Run", variant="primary", scale=1)
    with gr.Row():
        max_new = gr.Slider(8, MAX_NEW_TOKENS, value=64, step=8, label="max_new_tokens")
        block = gr.Slider(4, 128, value=demo.pipe.default_block_length, step=4, label="block length")
        steps = gr.Number(value=64, precision=0, label="steps (0 = max_new_tokens)")
        threshold = gr.Slider(0, 0.99, value=0, step=0.01, label="threshold (0 = one token per step)")
        edit = gr.Slider(0, 0.99, value=0, step=0.01, label="edit threshold (LLaDA2.1 token editing; 0 = off)",
                         visible=demo.pipe.model.block_diffusion)  # fmt: skip
    gr.Examples(EXAMPLES, inputs=prompt)
    labels = [m[0] for m in demo.modes(0)] + [""] * (3 - len(demo.modes(0)))
    canvases, texts = [], []
    with gr.Row():
        for label in labels:
            with gr.Column(visible=bool(label)):
                canvases.append(gr.HTML(label=label, value=f"<b>{label}</b>"))
                texts.append(gr.Textbox(label=f"{label} output", interactive=False))
    stats = gr.Markdown(elem_id="stats")
    inputs = [prompt, max_new, block, steps, threshold, edit]
    run.click(demo.run, inputs, [*canvases, *texts, stats], concurrency_limit=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dlmcache/tiny")
    ap.add_argument("--guide", default="dlmcache/tiny-guide", help="'' for no guided panel")
    ap.add_argument(
        "--vlm", default="tiny", help="'tiny' (random Qwen2-VL), a Qwen2-VL checkpoint, or '' for no VLM tab"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    demo = Demo(args.model, args.guide or None, args.device, dtype)
    vlm_demo = VLMDemo(None if args.vlm == "tiny" else args.vlm, args.device, dtype) if args.vlm else None
    build(demo, vlm_demo).queue(max_size=16, default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, css=CSS, show_error=True
    )


if __name__ == "__main__":
    main()
