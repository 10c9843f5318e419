"""``utils``: the one package every chapter of *LLMs, Executed* imports.

Modules (each short enough to read in one sitting):

- :mod:`utils.repro`     seeds and device selection
- :mod:`utils.measure`   median timings, peak memory, parameter counts, the machine's name
- :mod:`utils.models`    SmolLM2-135M-Instruct and all-MiniLM-L6-v2, offline
- :mod:`utils.data`      readers for the datasets in ``data/``
- :mod:`utils.book`      showing source, glueing numbers into prose, progress bars, plot style
- :mod:`utils.attention` attention as taught in Part 1 (and FlashAttention's tiled form), reused later
- :mod:`utils.tokenization` byte-level BPE, trained and applied (equal to the ``tokenizers`` library)
- :mod:`utils.positions` sinusoidal, rotary and ALiBi position information
- :mod:`utils.llama`     SmolLM2's architecture from scratch; parameter, memory and FLOP formulas
- :mod:`utils.pretrain`  data pipeline, schedule and training loop for small models trained from scratch
- :mod:`utils.decoding`  greedy, sampling, top-k/top-p, beam search and best-of-N on the KV cache
- :mod:`utils.moe`       a sparse mixture-of-experts layer, its balancing loss, parameter arithmetic
- :mod:`utils.quant`     absmax / zero-point integers, NF4 with block-wise scales, double quantization
- :mod:`utils.lora`      LoRA and DoRA layers from scratch (equal to peft), merging, adapters on disk
- :mod:`utils.sft`       chat-template examples with the loss on the response only, task data, metrics
- :mod:`utils.finetune`  cheap fine-tuning on a CPU: cached frozen trunk, trainable top layers, label scores
- :mod:`utils.surgery`   layer pruning by angular distance, distillation loss, proxy-tuning logits
- :mod:`utils.optim`     GaLore and an 8-bit Adam from scratch (equal to galore_torch)
- :mod:`utils.compare`   one task, one budget: eight fine-tuning methods on the top of a cached model
- :mod:`utils.preference` preference pairs from human ratings; Bradley-Terry, DPO, IPO, KTO, ORPO, SimPO
- :mod:`utils.ppo`       RLHF with PPO from scratch: rollouts, KL-penalised rewards, GAE, clipped objective
- :mod:`utils.dpo`       preference optimisation on a CPU: cached response log-probs, held-out metrics
- :mod:`utils.judge`     a language model as a pairwise judge; AI-feedback labels
- :mod:`utils.kvcache`   a preallocated KV cache for our Llama and cached generation
- :mod:`utils.roofline`  bandwidth and matmul microbenchmarks, the roofline and decode/prefill bounds
- :mod:`utils.speculative` draft-and-verify decoding (model and prompt-lookup drafters)
- :mod:`utils.embed`     cached sentence embeddings and the documentation corpus Part 5 searches
- :mod:`utils.vectors`   exact top-k, int8 and binary embedding quantization, truncation, MMR
- :mod:`utils.retrieval` the retrieval toolkit: chunking, BM25, dense and hybrid indexes, reranking, evaluation
- :mod:`utils.rag`       grounded answers with numbered sources and citations, answer metrics, compression
- :mod:`utils.rag_safety` access control audits, PII masking, prompt-injection defences, a chunk grader
- :mod:`utils.kg`        a knowledge graph of rule-extracted triples from the docs, and multi-hop walks
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
from utils.measure import benchmark, count_parameters, describe_machine, peak_memory_bytes
from utils.models import load_embedder, load_llm, mean_pool
from utils.repro import get_device, seed_everything

__all__ = [
    "ChapterClock",
    "benchmark",
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
