"""The machinery a real run needs, behind prift.py, model.py and data.py."""
