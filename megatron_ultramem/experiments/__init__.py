"""Evidence experiments at CPU scale (issue 6): `python -m megatron_ultramem.experiments`.

corpus.py  - the memory-hungry fact corpus and the fact-recall metric
configs.py - matched configurations (dense, MoE, PKM, UltraMem, ablations) and their counts
quality.py - trains every configuration for the same tokens; loss, recall, tokens/s
decode.py  - one decode step of the MLP slot (dense / MoE / UltraMem), bytes read, train step
"""
