"""Shared by the fine-tuning tests: a tiny byte-level BPE tokenizer with SmolLM2's ChatML chat template,
trained in memory on a few sentences, so that fine-tuning helpers are tested without downloading a model."""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def chatml_tokenizer(corpus: list[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus``, with ChatML special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHATML)


def tiny_llama(tokenizer: PreTrainedTokenizerFast, num_hidden_layers: int = 2,
               max_position_embeddings: int = 1024, attn_implementation: str | None = None, seed: int = 0):
    """A tiny random ``LlamaForCausalLM`` (hidden 32, 4 heads, 2 KV heads) sized to ``tokenizer``, in eval mode.
    Shared by the tests of every helper that runs a chat model, so none of them downloads one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_position_embeddings, initializer_range=0.2,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id,
                      attn_implementation=attn_implementation)
    return LlamaForCausalLM(cfg).eval()


def tiny_random_llama(num_hidden_layers: int = 3, vocab_size: int = 50):
    """A tiny random ``LlamaForCausalLM`` without a tokenizer (pad id 0, seed 0), in eval mode: for the
    tests that feed it token ids directly."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()
