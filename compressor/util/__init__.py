"""Infrastructure the domain packages share: atomic writes and the cache (`io`), progress without
printing (`progress`), scoped forward hooks (`hooks`) and data parallelism over windows (`parallel`)."""
