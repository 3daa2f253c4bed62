"""The inference engine: execution plans (``plans``: how the network runs) and their choice by
measurement on the host (``select``). Import from the submodules; this package imports nothing so
that ``service.runtime.config`` can read the plan names (``names``) without loading ONNX Runtime."""
