"""Parallelism plumbing that is not a sharding rule: FSDP that gathers packed integer codes
(:mod:`.code_gather`) and collective accounting from compiled HLO (:mod:`.hlo`)."""
