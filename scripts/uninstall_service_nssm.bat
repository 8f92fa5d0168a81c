@echo off
rem Remove o servico do monitor (para com seguranca antes de remover).
rem Uso (Prompt de Comando como Administrador): scripts\uninstall_service_nssm.bat [NomeDoServico]
setlocal EnableExtensions DisableDelayedExpansion
set "SERVICE=%~1"
if not defined SERVICE set "SERVICE=BemsoftMonitor"
where nssm >nul 2>nul
if errorlevel 1 goto no_nssm
nssm stop "%SERVICE%"
nssm remove "%SERVICE%" confirm || goto failed
echo Servico %SERVICE% removido.
exit /b 0
:no_nssm
echo NSSM nao encontrado no PATH.
exit /b 1
:failed
echo O NSSM nao removeu o servico %SERVICE% (veja a mensagem acima).
exit /b 1
