"""The pipeline's stages, in DAG order: fetch -> reconcile -> quantize -> write -> verify."""
from . import fetch, quantize, reconcile, verify, write

STAGES = [fetch.STAGE, reconcile.STAGE, quantize.STAGE, write.STAGE, verify.STAGE]
