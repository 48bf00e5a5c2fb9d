"""Train the bundled tiny models on the arithmetic problems of `dlmcache.tinytask`.

The bundled models were made with exactly these commands (seeded; about 50 + 15 minutes on 2 CPU cores):

    python scripts/train_tiny.py tokenizer --out /tmp/tiny
    python scripts/train_tiny.py dlm --out /tmp/tiny --steps 4000
    python scripts/train_tiny.py ar --tokenizer /tmp/tiny --out /tmp/tiny-guide --steps 1000 --layers 4

then copying /tmp/tiny and /tmp/tiny-guide to dlmcache/assets/tiny and dlmcache/assets/tiny-guide.
The long-prompt model (`dlmcache/tiny-long`: the same model fine-tuned on questions preceded by solved
problems as earlier chat turns) was made in four stages, each starting from the last (about 90 minutes
on 2 CPU cores in all; the first two, on 0-40 distractors and prompts up to 2k tokens, lost the
arithmetic: the bundled model had never seen more than one turn, its loss started at 5.6, and after
1,000 steps it copied operands but got 0% of the answers; on 0-12 distractors it recovered):

    python scripts/train_tiny.py dlm --init dlmcache/tiny --tokenizer dlmcache/assets/tiny --out /tmp/tl1 \
        --distractors 0-40 --max-length 2048 --batch-size 8 --lr 3e-4 --steps 800 --threads 1
    python scripts/train_tiny.py dlm --init /tmp/tl1 --tokenizer dlmcache/assets/tiny --out /tmp/tl2 \
        --distractors 0-40 --max-length 2048 --batch-size 16 --lr 2e-4 --steps 1200 --save-every 200 --threads 1 --bf16
    python scripts/train_tiny.py dlm --init /tmp/tl2/checkpoint-200 --tokenizer dlmcache/assets/tiny --out /tmp/tl3 \
        --distractors 0-12 --max-length 1024 --batch-size 16 --lr 2e-4 --steps 1500 --bf16
    python scripts/train_tiny.py dlm --init /tmp/tl3 --tokenizer dlmcache/assets/tiny --out /tmp/tl4 \
        --distractors 0-12 --max-length 1024 --batch-size 16 --lr 1.5e-4 --steps 1200 --bf16

(the second stage was stopped after its step-200 checkpoint, which the third started from; copy a
stage's tokenizer files next to a checkpoint to load it as a pipeline).

The block diffusion model (`dlmcache/tiny-block`: SDAR's architecture, blocks of 4) started from the
bundled model's weights (the q/k norms, which LLaDA lacks, at 1) and was trained by block diffusion's
recipe (35 minutes on 2 CPU cores):

    python scripts/train_tiny.py block --from-llada dlmcache/tiny --tokenizer dlmcache/assets/tiny \
        --out /tmp/tiny-block --steps 2000 --lr 5e-4 --save-every 500

`block` feeds [noisy copy; clean copy] of prompt + answer region under the block diffusion training
mask (SDAR, arXiv 2510.06303; Arriola et al., arXiv 2503.09573): a noisy block attends itself and the
clean blocks before it, so one forward trains every block of the answer, each conditioned on the
clean text before it, as decoding conditions it on the finished blocks.

`dlm` trains a masked diffusion LM with the LLaDA architecture (d_model 128, 6 layers, 1.65M parameters)
by LLaDA's SFT recipe (Nie et al., arXiv 2502.09992, Sec. 2.3): the prompt stays clean, every answer
token (the worked solution followed by EOS fill to 64 tokens) is masked with probability t ~ U(eps, 1),
and the loss is the cross-entropy on the masked tokens. We average it over masked tokens instead of
weighting by 1/t as the ELBO does: the same minimiser, far less gradient noise at this batch size.
Measured on the way (held-out accuracy, greedy, 64 steps): 7% at steps 500-2000 while the operand
copies and then the first computation formed, 79% at step 3000, 100% (of 100) at step 4000.
`ar` trains a small Llama-architecture causal LM (a `transformers` model) on the same problems and
tokenizer, a fifth of its batches with 1-6 solved problems as earlier chat turns: the guide for guided
unmasking, and the few-shot model of the KV-policy benchmark. Problems of the held-out test set
(`tinytask.test_problems`) never appear in training.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from dlmcache.kernels.ops import dense_attention
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dlmcache import tinytask
from dlmcache.locations import resolve_path
from dlmcache.models import LLaDAConfig, LLaDAModelLM, SDARConfig, SDARForCausalLM
from dlmcache.pipeline import chat_template_ids

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|mdm_mask|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
N_TEST = 500  # questions reserved for evaluation, excluded from training


def build_tokenizer(out: Path, seed: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (digits always split one per token) trained on 20k problems."""
    corpus = [f"{p.question} {p.solution}" for p in tinytask.make_problems(20_000, seed)]
    corpus += ["user\nassistant\n"] * 1000  # merge the chat-template role names
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        mask_token="<|mdm_mask|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )
    fast.save_pretrained(out)
    return fast


class ProblemStream:
    """Endless seeded stream of (prompt ids, solution ids) pairs, never a test question.

    A fraction `copy_frac` of the pairs are an auxiliary task, "Repeat EXPR." -> "EXPR": a masked
    diffusion model has to learn to find operands in the prompt at varying offsets, and this circuit
    forms in a few hundred steps on a pure copy task but had not formed after 500 steps of the
    arithmetic task alone (measured), so the copies bootstrap it.
    """

    def __init__(self, tokenizer, seed: int, copy_frac: float = 0.0, few_shot_frac: float = 0.0, distractors=None):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.copy_frac, self.few_shot_frac, self.distractors = copy_frac, few_shot_frac, distractors
        self.exclude = {p.question for p in tinytask.test_problems(N_TEST)}

    def problem(self) -> tinytask.Problem:
        while True:
            p = tinytask.make_problem(self.rng)
            if p.question not in self.exclude:
                return p

    def new_batch(self) -> None:
        """Whole batches are few-shot or not (and share one distractor count), so short rows are not
        padded to the length of long ones."""
        self.few_shot = self.rng.random() < self.few_shot_frac
        self.n_shots = self.rng.randint(*self.distractors) if self.distractors else self.rng.randint(1, 6)

    def next(self) -> tuple[list[int], list[int]]:
        p = self.problem()
        shots = []
        if self.distractors or getattr(self, "few_shot", False):  # solved problems as earlier chat turns
            shots = [self.problem() for _ in range(self.n_shots)]
        if self.rng.random() < self.copy_frac:
            expr = p.question.removeprefix("Compute ").removesuffix(".")
            question, answer = f"Repeat {expr}.", expr
        else:
            question, answer = p.question, p.solution
        chat = tinytask.messages(question, shots)
        return chat_template_ids(self.tok, chat), self.tok(answer, add_special_tokens=False)["input_ids"]


ANSWER_REGION = 64  # tokens generated by the demo: solution + EOS fill


def dlm_batch(stream: ProblemStream, batch_size: int, gen: torch.Generator, pad_id: int, eos_id: int, mask_id: int):
    """Left-padded prompts + an answer region of 64 tokens (solution, then EOS fill); answer tokens
    masked with probability t per row."""
    stream.new_batch()
    pairs = [stream.next() for _ in range(batch_size)]
    region = ANSWER_REGION
    p_len = max(len(p) for p, _ in pairs)
    ids = torch.full((batch_size, p_len + region), pad_id)
    attn = torch.zeros_like(ids)
    for i, (p, a) in enumerate(pairs):
        ids[i, p_len - len(p) : p_len] = torch.tensor(p)
        ids[i, p_len:] = torch.tensor(a + [eos_id] * (region - len(a)))
        attn[i, p_len - len(p) :] = 1
    t = (1 - 1e-3) * torch.rand(batch_size, 1, generator=gen) + 1e-3
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[:, p_len:] = torch.rand(batch_size, region, generator=gen) < t
    masked[torch.arange(batch_size), p_len + torch.randint(region, (batch_size,), generator=gen)] = True  # >= 1 per row
    noisy = ids.masked_fill(masked, mask_id)
    return noisy, attn, ids, masked


def block_batch(stream: ProblemStream, batch_size: int, gen: torch.Generator, pad_id: int, eos_id: int, mask_id: int,
                block: int):  # fmt: skip
    """Block diffusion's training input (SDAR; Arriola et al., arXiv 2503.09573): each row is prompt +
    answer region (solution, EOS fill to 64), right-padded so that column = position and blocks are
    absolute; the model sees a noisy copy (answer tokens masked with probability t per row) followed by
    the clean copy, under `BlockTrainingMask`: a noisy block attends itself and the clean blocks before
    it, a clean block the clean blocks up to itself. Returns (ids [B, 2L], positions, valid [B, L],
    target [B, L], masked [B, L])."""
    stream.new_batch()
    pairs = [stream.next() for _ in range(batch_size)]
    length = max(len(p) for p, _ in pairs) + ANSWER_REGION
    ids = torch.full((batch_size, length), pad_id)
    valid = torch.zeros(batch_size, length, dtype=torch.bool)
    answer = torch.zeros_like(valid)
    for i, (p, a) in enumerate(pairs):
        ids[i, : len(p)] = torch.tensor(p)
        ids[i, len(p) : len(p) + ANSWER_REGION] = torch.tensor(a + [eos_id] * (ANSWER_REGION - len(a)))
        valid[i, : len(p) + ANSWER_REGION] = True
        answer[i, len(p) : len(p) + ANSWER_REGION] = True
    t = (1 - 1e-3) * torch.rand(batch_size, 1, generator=gen) + 1e-3
    masked = answer & (torch.rand(batch_size, length, generator=gen) < t)
    pick = torch.multinomial(answer.float(), 1, generator=gen)[:, 0]
    masked[torch.arange(batch_size), pick] = True  # >= 1 per row
    noisy = ids.masked_fill(masked, mask_id)
    positions = torch.arange(length).expand(batch_size, -1)
    return torch.cat([noisy, ids], 1), torch.cat([positions, positions], 1), valid, ids, masked


class BlockTrainingMask:
    """A `KVStore` for training a block diffusion model on [noisy copy; clean copy] (see `block_batch`):
    attention over the fed tokens under the block diffusion training mask."""

    def __init__(self, valid: torch.BoolTensor, block: int):
        b, n = valid.shape
        index = torch.arange(2 * n)
        clean = index >= n
        blocks = (index % n) // block
        q_blk, k_blk = blocks[:, None], blocks[None, :]
        q_clean, k_clean = clean[:, None], clean[None, :]
        allowed = (
            ((q_blk == k_blk) & (q_clean == k_clean))  # a block with itself, in the same copy
            | ((q_blk > k_blk) & ~q_clean & k_clean)  # a noisy block reads the clean blocks before it
            | ((q_blk >= k_blk) & q_clean & k_clean)  # the clean copy is block-causal
        )
        keys = torch.cat([valid, valid], 1)
        self.mask = allowed[None] & keys[:, None, :]
        self.mask |= ~self.mask.any(-1, keepdim=True)  # padding queries attend everything (never read)

    def attend(self, layer_idx, q, k, v, backend):
        return dense_attention(q, k, v, self.mask, "torch")


def ar_batch(stream: ProblemStream, batch_size: int, pad_id: int, eos_id: int):
    """Right-padded prompt + solution + EOS; labels only on the solution and its EOS."""
    stream.new_batch()
    pairs = [stream.next() for _ in range(batch_size)]
    length = max(len(p) + len(a) + 1 for p, a in pairs)
    ids = torch.full((batch_size, length), pad_id)
    labels = torch.full((batch_size, length), -100)
    attn = torch.zeros_like(ids)
    for i, (p, a) in enumerate(pairs):
        seq = p + a + [eos_id]
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(a + [eos_id])
        attn[i, : len(seq)] = 1
    return ids, attn, labels


def copy_llada_weights(model: SDARForCausalLM, path: str) -> None:
    """Start a block diffusion model from a trained LLaDA of the same width and depth: embeddings,
    projections, MLPs and norms are copied (the per-head q/k norms, which LLaDA lacks, start at 1)."""
    llada = LLaDAModelLM.from_pretrained(path, dtype=torch.float32)
    src = {k.removeprefix("model.transformer."): v for k, v in llada.state_dict().items()}
    names = {
        "wte.weight": "model.embed_tokens.weight",
        "ln_f.weight": "model.norm.weight",
        "ff_out.weight": "lm_head.weight",
    }
    per_layer = {
        "attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
        "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj",
    }  # fmt: skip
    for i in range(model.config.num_hidden_layers):
        for a, b in per_layer.items():
            names[f"blocks.{i}.{a}.weight"] = f"model.layers.{i}.{b}.weight"
    state = model.state_dict()
    for a, b in names.items():
        state[b] = src[a]
    model.load_state_dict(state)


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    tok = AutoTokenizer.from_pretrained(args.tokenizer or out)
    pad_id, eos_id, mask_id = tok.pad_token_id, tok.eos_token_id, tok.mask_token_id
    vocab = len(tok)
    if args.what == "dlm":
        config = LLaDAConfig(
            d_model=args.d_model,
            n_layers=args.layers,
            n_heads=args.heads,
            mlp_hidden_size=args.mlp,
            vocab_size=vocab,
            embedding_size=vocab,
            max_sequence_length=args.max_length,
            rope_theta=10000.0,
            mask_token_id=mask_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
        if args.init is None:
            model = LLaDAModelLM(config)
        else:
            model = LLaDAModelLM.from_pretrained(resolve_path(args.init), dtype=torch.float32)
            model.config.max_sequence_length = args.max_length
    elif args.what == "block":
        config = SDARConfig(
            vocab_size=vocab,
            hidden_size=args.d_model,
            intermediate_size=args.mlp,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
            head_dim=args.d_model // args.heads,
            max_position_embeddings=args.max_length,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            block_size=args.block,
            mask_token_id=mask_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            bos_token_id=eos_id,
        )
        model = SDARForCausalLM(config)
        if args.init is not None:
            model = SDARForCausalLM.from_pretrained(resolve_path(args.init), dtype=torch.float32)
        elif args.from_llada:
            copy_llada_weights(model, resolve_path(args.from_llada))
    else:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=args.d_model,
            intermediate_size=args.mlp,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
        model = LlamaForCausalLM(config) if args.init is None else LlamaForCausalLM.from_pretrained(args.init)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.what}: {n_params / 1e6:.2f}M parameters, vocab {vocab}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    few_shot = args.few_shot_frac if args.what == "ar" else 0.0
    distractors = tuple(int(k) for k in args.distractors.split("-")) if args.distractors else None
    stream = ProblemStream(
        tok, args.seed + 1, copy_frac=args.copy_frac, few_shot_frac=few_shot, distractors=distractors
    )
    gen = torch.Generator().manual_seed(args.seed + 2)
    model.train()
    start, log = time.time(), []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        if args.what == "dlm":
            noisy, attn, target, masked = dlm_batch(stream, args.batch_size, gen, pad_id, eos_id, mask_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(noisy, attention_mask=attn).logits
            loss = F.cross_entropy(logits[masked].float(), target[masked])
        elif args.what == "block":
            ids, positions, valid, target, masked = block_batch(
                stream, args.batch_size, gen, pad_id, eos_id, mask_id, args.block
            )
            noisy_half = torch.arange(valid.shape[1])  # logits of the noisy copy only
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(
                    ids, positions=positions, cache=BlockTrainingMask(valid, args.block), logits_index=noisy_half
                ).logits
            loss = F.cross_entropy(logits[masked].float(), target[masked])
        else:
            ids, attn, labels = ar_batch(stream, args.batch_size, pad_id, eos_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.time() - start
            log.append({"step": step, "loss": round(loss.item(), 4), "minutes": round(elapsed / 60, 2)})
            print(json.dumps(log[-1]), flush=True)
        if args.save_every and step and step % args.save_every == 0:
            model.save_pretrained(out / f"checkpoint-{step}")
    model.eval()
    model.half().save_pretrained(out)  # float16 on disk keeps the bundled assets small
    tok.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["tokenizer", "dlm", "block", "ar"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", help="directory of the tokenizer (default: --out)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    # Narrow and deep learns to find operands fastest (measured on a copy task: d=128 x 6 layers
    # copies after 300 steps, d=256 x 6 layers is at 56% then).
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--copy-frac", type=float, default=0.0, help="share of auxiliary copy examples")
    ap.add_argument(
        "--few-shot-frac",
        type=float,
        default=0.2,
        help="ar only: share of batches with 1-6 solved problems as earlier turns (few-shot KV-compression checks)",
    )
    ap.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast for the matmuls (fp32 weights and optimizer)",
    )
    ap.add_argument("--init", help="continue from this saved model (a checkpoint-STEP/ directory or a bundled name)")
    ap.add_argument("--max-length", type=int, default=512, help="dlm: the model's max_sequence_length")
    ap.add_argument(
        "--distractors",
        help="dlm: LO-HI solved problems as earlier chat turns before every question (the long-prompt model)",
    )
    ap.add_argument("--save-every", type=int, default=0, help="also save checkpoint-STEP/ every N steps")
    ap.add_argument("--block", type=int, default=4, help="block: the block length (SDAR's default, 4)")
    ap.add_argument("--from-llada", help="block: start from this trained LLaDA of the same width and depth")
    args = ap.parse_args()
    if args.what == "tokenizer":
        build_tokenizer(Path(args.out), args.seed)
    else:
        train(args)


if __name__ == "__main__":
    main()
