"""Speed and accuracy benchmarks of csist-unmix (``csist bench speed|accuracy``).

Development tooling: it imports torch and ``training`` (unlike ``service``).
"""
