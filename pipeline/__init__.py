"""The editing engine (engine.py and the modules it composes) and the main job on Ray
(job.py, stage.py, outputs.py)."""
