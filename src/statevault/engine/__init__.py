"""Plans and their execution: prepare -> stage -> write -> (commit.py) and the ranged reader."""
