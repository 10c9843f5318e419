"""``utils``: the one package every chapter of *LLMs, Executed* imports.

The package stays flat, one file per concept (``utils/<concept>.py``), and this map groups the files by
concern. Chapters import ``from utils.<concept> import ...`` in every part; moving files into
subpackages would break those imports (and every reader's own notebooks) for a tidier tree, while the
map below gives a newcomer the same grouping. Each module is short enough to read in one sitting.

The model and its parts (Part 1)

- :mod:`utils.tokenization` byte-level BPE, trained and applied (equal to the ``tokenizers`` library)
- :mod:`utils.attention` attention as taught in Part 1 (and FlashAttention's tiled form), reused later
- :mod:`utils.positions` sinusoidal, rotary (both pair layouts) and ALiBi position information
- :mod:`utils.llama`     SmolLM2's architecture from scratch; parameter, memory and FLOP formulas
- :mod:`utils.moe`       a sparse mixture-of-experts layer, its balancing loss, parameter arithmetic
- :mod:`utils.models`    SmolLM2-135M-Instruct and all-MiniLM-L6-v2, offline
- :mod:`utils.chat`      chat messages, prompt ids, left padding, batched replies, a shared prefix run once
- :mod:`utils.hf_llama`  the one file that knows transformers' Llama internals: trunk caches, top layers

Training and fine-tuning (Parts 1-2)

- :mod:`utils.pretrain`  data pipeline, schedule and training loop for small models trained from scratch
- :mod:`utils.optim`     GaLore and an 8-bit Adam from scratch (equal to galore_torch)
- :mod:`utils.lora`      LoRA, DoRA and (IA)^3 layers from scratch (equal to peft), merging, adapters on disk
- :mod:`utils.sft`       chat-template examples with the loss on the response only, task data
- :mod:`utils.finetune`  cheap fine-tuning on a CPU: cached frozen trunk, trainable top layers, label scores
- :mod:`utils.surgery`   layer pruning by angular distance, distillation loss, proxy-tuning logits
- :mod:`utils.compare`   one task, one budget: eight fine-tuning methods on the top of a cached model

Alignment (Part 3)

- :mod:`utils.preference` preference pairs from human ratings; Bradley-Terry, DPO, IPO, KTO, ORPO, SimPO
- :mod:`utils.ppo`       RLHF with PPO from scratch: rollouts, KL-penalised rewards, GAE, clipped objective
- :mod:`utils.dpo`       preference optimisation on a CPU: cached response log-probs, held-out metrics
- :mod:`utils.judge`     a language model as a pairwise judge; AI-feedback labels

Inference (Parts 1 and 4)

- :mod:`utils.decoding`  greedy, sampling, top-k/top-p, beam search and best-of-N on the KV cache
- :mod:`utils.kvcache`   a preallocated KV cache for our Llama and its one generation loop (cached or not)
- :mod:`utils.quant`     absmax / zero-point integers, NF4 with block-wise scales, double quantization
- :mod:`utils.roofline`  bandwidth and matmul microbenchmarks, the roofline and decode/prefill bounds
- :mod:`utils.speculative` draft-and-verify decoding (model and prompt-lookup drafters)

Retrieval (Part 5)

- :mod:`utils.embed`     cached sentence embeddings, the two corpora Part 5 searches, MNRL fine-tuning
- :mod:`utils.vectors`   exact top-k, int8 and binary embedding quantization, truncation, MMR
- :mod:`utils.retrieval` the retrieval toolkit: structure-aware chunking, BM25, dense, fused indexes, reranking,
  passage-level evaluation
- :mod:`utils.reranker`  a small cross-encoder reranker cut from MiniLM, hard-negative groups, its training
- :mod:`utils.rag`       grounded prompts with numbered sources, citations, sentence splitting, compression
- :mod:`utils.rag_advanced` corrective retrieval: a chunk grader and the context it passes on
- :mod:`utils.rag_safety` access control audits, PII masking, prompt-injection defences
- :mod:`utils.kg`        a knowledge graph of rule-extracted triples from the docs, and multi-hop walks

Prompting and agents (Part 6)

- :mod:`utils.prompting` few-shot prompts, label scores from a cached prefix, calibration, self-consistency
- :mod:`utils.constrained` a regex or JSON schema compiled to a byte automaton; allowed tokens as a logits mask
- :mod:`utils.tools`     tools as an allow-list: the call format, parsing, validated execution, injection defences
- :mod:`utils.agent`     a tool-using agent loop with a step budget, reflection, voting, a failure taxonomy

Evaluation and reasoning (Part 7: modules first, chapters to come)

- :mod:`utils.evaluation` log-likelihood multiple choice as lm-eval scores it, pass@k, n-gram contamination, kappa
- :mod:`utils.grpo`      GRPO from scratch: group advantages (GRPO, Dr. GRPO, RLOO), k3 KL, TRL's four loss types

Distributed and serving (Part 8)

- :mod:`utils.distributed` ``launch``: a function on several processes joined by torch.distributed (gloo/nccl)
- :mod:`utils.ddp`       ring all-reduce from send/recv, bytes per rank, DDP and gradient accumulation checks
- :mod:`utils.sharding`  ZeRO stage memory, FSDP2 shard sizes, sharded training, dcp checkpoints, kill and resume
- :mod:`utils.model_parallel` Megatron tensor parallelism, pipeline stages and bubbles, expert parallelism
- :mod:`utils.fastdecode` weight-only int8/int4 layers on PyTorch's packed CPU kernels, bytes per token, decode bound
- :mod:`utils.serving`   ragged batches with a padding mask, a paged KV cache, continuous batching, multi-LoRA

Book infrastructure (every part)

- :mod:`utils.book`      showing source, glueing numbers into prose, progress bars, plot style
- :mod:`utils.measure`   median and interleaved timings, peak memory, parameter counts, the machine's name
- :mod:`utils.stats`     intervals and the verdict words for every comparison
- :mod:`utils.metrics`   answer metrics (exact match, token F1, containment) and retrieval metrics (recall@k, MRR)
- :mod:`utils.repro`     seeds and device selection
- :mod:`utils.paths`     the repository's folders and the cache directory
- :mod:`utils.data`      readers for the datasets in ``data/``
- :mod:`utils.checks`    argument checks shared by every module (positive ints, positive numbers)

Rules for a new module (Parts 6-8 will add about a dozen):

1. One concept, one file: ``utils/<concept>.py``, a short lowercase noun (``kvcache``, ``retrieval``),
   never a subpackage. Add one line for it under its group above (a new group if none fits), in the
   order the book teaches.
2. Its docstring says what it holds and which chapter teaches it; every public function has type hints
   and a docstring; errors name the problem and the fix (use :mod:`utils.checks` for argument checks).
3. It declares ``__all__``, the names chapters and other modules may use; every other name starts with
   ``_``. ``tests/test_structure.py`` fails if a chapter or module imports a ``_`` name from ``utils``
   or a name missing from ``__all__``.
4. It has its own tests, ``tests/test_<concept>.py``.
5. One idea lives once: search this map before writing a helper, and extend the module that owns the
   idea (verdict words come from :mod:`utils.stats`, glued numbers from :mod:`utils.book`). Imports go
   from a concern to the ones it builds on (infrastructure, then the model, then the rest), never in a
   cycle.

The warning filters below hold only if ``utils`` is imported before the libraries that warn at import
time, so every chapter's setup cell imports it first (checked by ``tests/test_warnings_order.py``);
a chapter's own import cell may then list its imports in any order.
"""
import logging
import warnings

# tqdm.auto warns that ipywidgets is missing whenever transformers imports it. The book never uses
# widget progress bars (a static page cannot show them; see utils.progress), so the warning is noise.
warnings.filterwarnings("ignore", message="IProgress not found")
# bitsandbytes logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels` package (which
# would download a kernel from the Hub) is absent. The book never needs that kernel; the message is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft still calls transformers' `is_gradient_checkpointing`, renamed in transformers 5; the FutureWarning
# is about peft's code, not the reader's, and would sit in the page under every LoRA wrap.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

from utils.book import ChapterClock, glue, progress, show_source, use_book_style
from utils.measure import (benchmark, benchmark_interleaved, count_parameters, describe_machine,
                           peak_memory_bytes)
from utils.models import load_embedder, load_llm, mean_pool
from utils.repro import get_device, seed_everything

__all__ = [
    "ChapterClock",
    "benchmark",
    "benchmark_interleaved",
    "count_parameters",
    "describe_machine",
    "get_device",
    "glue",
    "load_embedder",
    "load_llm",
    "mean_pool",
    "peak_memory_bytes",
    "progress",
    "seed_everything",
    "show_source",
    "use_book_style",
]
