from flux_mcp.cli import main

main()
