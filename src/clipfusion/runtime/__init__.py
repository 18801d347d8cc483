"""The torch-free runtime of exported models (``pip install 'clipfusion[runtime]'``): OpenVINO Runtime,
NumPy, Pillow and SciPy only.  Nothing under this package, nor anything it imports, imports torch."""
