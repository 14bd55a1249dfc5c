"""`promptswap train`: examples in, a servable task out (prompt tuning, P-tuning, prefix tuning with PEFT).

data.py reads and checks the examples and turns them into token ids exactly as the server will see
them; peft_setup.py builds the PEFT model; run.py trains it with transformers' Trainer, measures it
with a greedy loop of our own and writes the adapter (with its template and choices); cli.py is the
command; upload.py sends the result to a running server.
"""
