"""`python -m bemsoft_monitor.service_account <servico> <conta>`: gives the Windows service
its account through NSSM (`nssm set <servico> ObjectName <conta> <senha>`). Called by
scripts/install_service_nssm.bat.

The password is read without echo (getpass), twice; or, when standard input is not a
terminal (`< arquivo`, an unattended install), from its first line. It never comes from the
command line, so it stays out of the console history (doskey) and of the installer's own
command line. NSSM takes it only as an argument: it is handed over as one element of an
argument list (no shell; quotes, spaces, `&` and `%` in it arrive as typed) and is visible on
nssm.exe's command line for the instant nssm runs (see the README)."""
from __future__ import annotations

import argparse
import getpass
import subprocess
import sys

DESCRIPTION = """Define a conta do serviço do Windows (NSSM ObjectName). A senha é pedida sem
eco (duas vezes) ou lida da primeira linha da entrada padrão quando ela não é um terminal.
Contas sem senha: gMSA (terminada em $), "NT SERVICE\\<serviço>", "NT AUTHORITY\\...",
LocalSystem."""
ATTEMPTS = 3


def needs_password(account: str) -> bool:
    """Group managed service accounts (`DOMINIO\\gmsa$`), virtual accounts (`NT SERVICE\\x`)
    and the built-in ones (`NT AUTHORITY\\NetworkService`, LocalSystem) have none."""
    name = account.strip().casefold()
    return not (name.endswith("$") or name.startswith(("nt service\\", "nt authority\\"))
                or name == "localsystem")


def read_password(account: str, stdin, err, prompt=getpass.getpass) -> str | None:
    """The password, or None when none was given (empty, or the two entries never matched)."""
    if not stdin.isatty():
        return stdin.readline().rstrip("\r\n") or None
    for _ in range(ATTEMPTS):
        password = prompt(f"Senha da conta {account} (não aparece ao digitar): ")
        if not password:
            print("Senha vazia: digite a senha da conta.", file=err)
        elif prompt("Confirme a senha: ") == password:
            return password
        else:
            print("As senhas não conferem; digite de novo.", file=err)
    return None


def main(argv=None, stdin=None, err=None) -> int:
    stdin, err = stdin or sys.stdin, err or sys.stderr
    parser = argparse.ArgumentParser(prog="python -m bemsoft_monitor.service_account",
                                     description=DESCRIPTION)
    parser.add_argument("service", help="nome do serviço no NSSM")
    parser.add_argument("account", help="DOMINIO\\usuario, .\\usuario, DOMINIO\\gmsa$ ...")
    args = parser.parse_args(argv)
    password = ""
    if needs_password(args.account):
        try:
            password = read_password(args.account, stdin, err)
        except (KeyboardInterrupt, EOFError):
            password = None
        if password is None:
            print(f"A conta {args.account} não foi configurada: nenhuma senha informada.", file=err)
            return 1
    try:
        done = subprocess.run(["nssm", "set", args.service, "ObjectName", args.account, password])
    except OSError as error:
        print(f"Não foi possível executar o nssm: {error}", file=err)
        return 1
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
