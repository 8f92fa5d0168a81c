"""Failure reasons reduced to a fixed vocabulary: what went wrong and what to fix, in our
own words. A reason may quote the LIS or the API (a patient's name in a 400's echo, a CPF
in a code), so whatever leaves the machine in a message — an alert, a digest — carries the
category, never the reason's text."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Category:
    key: str
    label: str      # what went wrong (pt-BR)
    fix: str        # what the lab does about it (pt-BR)


# (words of our own reason texts, category), checked in order: the first that appears wins
CATEGORIES: tuple[tuple[str, Category], ...] = (
    ("item sem CodSolicitacao", Category(
        "sem-solicitacao", "item sem CodSolicitacao", "vincule o item à sua solicitação no LIS")),
    ("não encontrada na tabela solicitacao", Category(
        "solicitacao-ausente", "item aponta para uma solicitação que não existe",
        "confira o cadastro da solicitação no LIS")),
    ("aparece mais de uma vez", Category(
        "duplicada", "linhas duplicadas com dados diferentes no LIS",
        "apague a linha duplicada errada no LIS")),
    ("sem codpaciente e sem CPF", Category(
        "paciente-sem-id", "paciente sem código e sem CPF",
        "preencha solicitacao.codpaciente ou o CPF do paciente")),
    ("sem nome", Category(
        "paciente-sem-nome", "paciente sem nome", "preencha o nome ou crie o cadastro do paciente")),
    ("sem data de nascimento", Category(
        "sem-nascimento", "paciente sem data de nascimento válida",
        "corrija paciente.datanasc ou defina DEFAULT_BIRTHDATE no .env")),
    ("sem sexo M/F", Category(
        "sem-sexo", "paciente sem sexo M/F", "corrija paciente.sexo ou defina DEFAULT_GENDER no .env")),
    ("sem código de exame", Category(
        "sem-exame", "item sem código de exame", "preencha ItemSol.CodConvExames")),
    ("não existe no catálogo /tests", Category(
        "fora-do-catalogo", "exame fora do catálogo /tests da Bemsoft",
        "cadastre o exame na Bemsoft ou mapeie o código em BEMSOFT_TEST_MAP_PATH")),
    ("definido em BEMSOFT_TEST_MAP_PATH não existe", Category(
        "material-do-mapa", "material do mapeamento fora do catálogo",
        "corrija o material em BEMSOFT_TEST_MAP_PATH")),
    ("o banco recusou o registro do monitor", Category(
        "banco-recusou", "o banco recusou o registro do monitor em _MonitorItems",
        "confira restrições ou gatilhos criados em _MonitorItems")),
    ("com erro no corpo", Category(
        "erro-no-corpo", "a API respondeu com erro no corpo (nada foi salvo)",
        "leia a resposta no arquivo de falha e corrija o pedido")),
    ("HTTP 400", Category(
        "validacao", "a API rejeitou o pedido (HTTP 400, validação)",
        "leia a resposta no arquivo de falha e corrija o cadastro")),
    ("HTTP 403", Category(
        "recusado-403", "a API recusou o pedido (HTTP 403)",
        "confira com a Bemsoft a permissão para esse pedido")),
    ("vezes seguidas enquanto outras", Category(
        "repetidas", "falhas transitórias repetidas só nesta solicitação",
        "veja a última resposta no arquivo de falha")),
    ("erro inesperado", Category(
        "inesperado", "erro inesperado do monitor", "guarde o arquivo e o log e reporte")),
    ("API respondeu HTTP", Category(
        "http", "a API respondeu com outro erro HTTP", "veja a resposta no arquivo de falha")),
)
OTHER = Category("outro", "outro motivo", "veja o campo reason do arquivo em FAILED_DIR")


def categorize(reason: str) -> Category:
    text = str(reason)
    for words, category in CATEGORIES:
        if words in text:
            return category
    return OTHER


_ITEM_PREFIX = re.compile(r"^item [^:]{1,40}: ")
_PATIENT_ID = re.compile(r"\bpaciente\s+(?:(?:pat|cpf)-)?[0-9][0-9.\-]*\s*")
_LONG_NUMBER = re.compile(r"\d[\d.\-/]{3,}\d")


def reason_group(reason: str) -> str:
    """A failure reason reduced to what groups it and shows no patient data: the first item's
    reason, up to the first ': ' (what follows may echo the API's answer), without the patient
    identifier (it can be a CPF) and with long numbers (CPF, dates) masked."""
    text = " ".join(str(reason).split())
    text = _ITEM_PREFIX.sub("", text).split("; item ", 1)[0]
    text = text.split(": ", 1)[0]
    text = _PATIENT_ID.sub("paciente ", text)
    text = _LONG_NUMBER.sub("…", text)
    return (text[:117] + "…") if len(text) > 120 else (text or "sem motivo registrado")
