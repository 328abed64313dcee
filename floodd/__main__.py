from floodd.cli import main

raise SystemExit(main())
