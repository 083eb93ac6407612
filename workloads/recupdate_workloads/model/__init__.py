"""The LLM: prompt template, base bootstrap, generation and ranking, training core.

Submodules (import them directly; this package imports nothing heavy, so ``model.prompt`` and
``model.examples`` stay usable without torch):

- ``prompt``     versioned template: ``render``, ``render_example``, ``answer_text``, ``prompt_hash``
- ``examples``   ``curate`` triples, ``build_examples`` -> ``Examples`` (prompts + answers, jsonl/parquet)
- ``bootstrap``  ``build_tokenizer``, ``build_model``, ``bootstrap`` (train a small base), ``load_base``
- ``standin``    ``build``: a stand-in for a downloaded Hugging Face model (BPE tokenizer, Qwen2 or GPT-2)
- ``hf``         device and dtype for any model, LoRA target modules per architecture
- ``generate``   ``rank_clusters`` (likelihood top-N), ``cluster_logprobs``, ``generate_names`` (greedy or
                 constrained, exact-match mapped), ``beam_clusters``, ``exact_match_rate``
- ``training``   answer-only loss with logits at the answer positions only, ``fit``
- ``toy``        a tiny deterministic task for tests and benchmarks

LoRA fine-tuning (inline or Ray Train) lives in ``recupdate_workloads.model.train_loop``.
"""
