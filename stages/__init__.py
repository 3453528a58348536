"""The pipeline's stages, in DAG order: fetch -> reconcile -> write -> verify."""
from . import fetch, reconcile, verify, write

STAGES = [fetch.STAGE, reconcile.STAGE, write.STAGE, verify.STAGE]
