"""Real deployment on Flower: the same algorithm objects, run over SuperLink and SuperNodes.

Needs the ``flower`` extra (``pip install 'fedspine[flower]'``).
"""
