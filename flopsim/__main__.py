from flopsim.cli import main

if __name__ == "__main__":  # `python -m flopsim`; an import runs nothing
    main()
