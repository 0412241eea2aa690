"""LangChain and LlamaIndex on top of llmbatch (issue 21): their bulk calls become one batch job.

`client` runs a list of request lines as one job, over the HTTP Batches API or in this process;
`langchain` and `llamaindex` hold the adapters (optional extras: `pip install llmbatch[langchain]`,
`llmbatch[llamaindex]`).
"""
