@echo off
rem Remove o servico do monitor (para com seguranca antes de remover).
rem Uso: scripts\uninstall_service_nssm.bat [NomeDoServico]
setlocal
set "SERVICE=%~1"
if "%SERVICE%"=="" set "SERVICE=BemsoftMonitor"
where nssm >nul 2>nul || (echo NSSM nao encontrado no PATH. & exit /b 1)
nssm stop "%SERVICE%"
nssm remove "%SERVICE%" confirm || exit /b 1
echo Servico %SERVICE% removido.
exit /b 0
