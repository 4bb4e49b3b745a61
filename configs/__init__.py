"""ml_collections configs, read by path (`get_config(arg)`): the DeRIS family in deris.py
(`deris.py:variant=b,data=refcoco`; the four released names deris_{b,l}_{refcoco,grefcoco}.py
are its aliases), the default job synthetic.py, and deris_tiny.py / deris_micro.py for tests."""
